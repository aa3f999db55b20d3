"""A Breakout player that reads the game's RAM: it launches the ball and keeps the paddle under it.

RAM addresses (from the Atari annotated RAM of AtariARI, checked against this game's emulator in
``tests/test_collect_atari.py``): 72 = paddle x (55 at the left wall .. 191 at the right), 99 = ball x,
101 = ball y (0 while no ball is in play). The paddle's centre is about ``PADDLE_CENTRE`` to the right of its x.
Minimal action set: 0 NOOP, 1 FIRE, 2 RIGHT, 3 LEFT.
"""
from __future__ import annotations

import numpy as np

PADDLE_X, BALL_X, BALL_Y = 72, 99, 101
PADDLE_CENTRE = 8  # measured: returns peak with the target 6..12 to the right of the paddle's x
DEAD_ZONE = 2  # no move when the ball is this close to the paddle's centre
NOOP, FIRE, RIGHT, LEFT = 0, 1, 2, 3


def breakout_action(ram: np.ndarray) -> int:
    """FIRE when no ball is in play, else move the paddle's centre towards the ball's x."""
    if ram[BALL_Y] == 0:
        return FIRE
    offset = int(ram[BALL_X]) - (int(ram[PADDLE_X]) + PADDLE_CENTRE)
    if offset > DEAD_ZONE:
        return RIGHT
    if offset < -DEAD_ZONE:
        return LEFT
    return NOOP
