"""Behaviour policies for the Atari collector: scripted players mixed with epsilon-random actions."""
