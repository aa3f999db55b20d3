"""Collect real Atari play into DQN-Replay checkpoint files (``<out>/<Game>/<run>/replay_logs/``).

The environment follows the protocol DQN-Replay was collected with (Dopamine's ``create_atari_environment`` with
sticky actions, as batch_rl's ``dqn.gin`` sets): ``ALE/<Game>-v5`` with ``frameskip=1``, sticky actions p = 0.25,
the minimal action set, under ``AtariPreprocessing`` with action repeat 4, max-pool over the last two frames,
84x84 grayscale (``INTER_AREA``), no no-op starts and life loss not terminal. Episodes end at game over or after
27,000 agent steps; both are stored with terminal = 1 (Dopamine 2019's ``end_episode``). Rewards are stored clipped
to [-1, 1]. Row i holds the frame the action was chosen in, the action, the clipped reward and the terminal flag.

Behaviour: no trained DQN is available, so episodes cycle through epsilon values (default 0, 0.1, 0.3, 0.6, 1.0):
with probability epsilon a uniformly random action, otherwise a scripted player (Breakout: the RAM-reading
paddle tracker of ``data_pipeline.policies.breakout``). Games without a scripted player (e.g. Pong) get uniformly
random actions throughout. The buffer is batch_rl's logging buffer (``data_pipeline.formats.dopamine``): a
checkpoint each time the circular buffer of ``capacity`` rows fills, and the partial last one at the end.
A seed fixes the env (sticky actions included) and the policy, so a collection is byte-reproducible.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from data_pipeline.atomic import atomic_write_json
from data_pipeline.formats.dopamine import LoggedReplayBuffer
from data_pipeline.policies.epsilon import EpsilonPlayer

EPSILONS = (0.0, 0.1, 0.3, 0.6, 1.0)
MAX_EPISODE_STEPS = 27_000  # agent steps (108,000 frames), as DQN-Replay
STICKY_ACTIONS = 0.25
FRAME_SKIP = 4


def make_env(game: str, sticky: float = STICKY_ACTIONS):
    """The collection env: ALE v5 (frameskip 1, sticky actions) under AtariPreprocessing (skip 4, 84x84 gray)."""
    import ale_py
    import gymnasium as gym

    gym.register_envs(ale_py)
    env = gym.make(f"ALE/{game}-v5", frameskip=1, repeat_action_probability=sticky, full_action_space=False,
                   max_num_frames_per_episode=MAX_EPISODE_STEPS * FRAME_SKIP)
    return gym.wrappers.AtariPreprocessing(env, noop_max=0, frame_skip=FRAME_SKIP, screen_size=84,
                                           terminal_on_life_loss=False, grayscale_obs=True, scale_obs=False)


@dataclass
class EpisodeLog:
    epsilon: float
    steps: int
    score: float  # raw game score
    clipped_return: float  # sum of stored (clipped) rewards
    complete: bool  # ended by game over or the cap (not by the end of the collection)


@dataclass
class CollectionSummary:
    game: str
    seed: int
    transitions: int
    capacity: int
    checkpoints: int
    skipped_logs: int
    episodes: list[EpisodeLog] = field(default_factory=list)

    def by_epsilon(self) -> dict[str, dict]:
        """Mean/min/max raw score and clipped return of complete episodes, per epsilon."""
        out = {}
        for eps in sorted({e.epsilon for e in self.episodes}):
            done = [e for e in self.episodes if e.epsilon == eps and e.complete]
            if done:
                s = np.array([e.score for e in done])
                c = np.array([e.clipped_return for e in done])
                out[str(eps)] = {"episodes": len(done), "score_mean": float(s.mean()), "score_min": float(s.min()),
                                 "score_max": float(s.max()), "clipped_return_mean": float(c.mean()),
                                 "mean_length": float(np.mean([e.steps for e in done]))}
        return out


def collect_atari(game: str, output_dir: str | Path, transitions: int, seed: int = 0, *, capacity: int = 10_000,
                  run: int = 1, epsilons: tuple[float, ...] = EPSILONS, max_episode_steps: int = MAX_EPISODE_STEPS,
                  progress: bool = True) -> Path:
    """Play ``game`` (ALE name, e.g. ``"Breakout"``) for ``transitions`` agent steps and write DQN-Replay
    checkpoints of ``capacity`` rows (padding included) to ``output_dir/<game>/<run>/replay_logs``; return that
    folder. ``epsilons`` are cycled episode by episode; ``max_episode_steps`` is the episode cap (terminal = 1).
    A ``collection.json`` beside ``replay_logs`` records the settings and every episode's epsilon, length and
    score."""
    if transitions <= 0:
        raise ValueError(f"transitions must be positive, got {transitions}")
    run_dir = Path(output_dir) / game / str(run)
    log_dir = run_dir / "replay_logs"
    if log_dir.exists() and any(log_dir.iterdir()):
        raise FileExistsError(f"{log_dir} already holds files; choose an empty output folder")
    summary = collect_into(game, log_dir, transitions, seed, capacity, epsilons, max_episode_steps, progress)
    atomic_write_json(run_dir / "collection.json",
                      {**asdict(summary), "by_epsilon": summary.by_epsilon(),
                       "protocol": {"sticky_actions": STICKY_ACTIONS, "frame_skip": FRAME_SKIP,
                                    "max_episode_steps": max_episode_steps, "noop_max": 0,
                                    "terminal_on_life_loss": False, "reward_clip": [-1, 1]}}, indent=1)
    return log_dir


def collect_into(game: str, log_dir: Path, transitions: int, seed: int, capacity: int,
                 epsilons: tuple[float, ...], max_episode_steps: int, progress: bool) -> CollectionSummary:
    """The collection loop; returns what was played."""
    env = make_env(game)
    ale = env.unwrapped.ale
    player = EpsilonPlayer(game, int(env.action_space.n), np.random.default_rng(seed))
    buffer = LoggedReplayBuffer(log_dir, capacity)
    summary = CollectionSummary(game, seed, transitions, capacity, 0, 0)
    obs, _ = env.reset(seed=seed)
    eps, steps, score, clipped = epsilons[0], 0, 0.0, 0.0
    with tqdm(total=transitions, desc=f"{game} seed {seed}", unit="step", disable=not progress) as bar:
        for done_steps in range(1, transitions + 1):
            action = player.act(ale.getRAM(), eps)
            next_obs, reward, terminated, truncated, _ = env.step(action)
            steps += 1
            score += float(reward)
            r = float(np.clip(reward, -1.0, 1.0))
            clipped += r
            end = terminated or truncated or steps >= max_episode_steps
            buffer.add(obs, action, r, end)
            bar.update()
            if end:
                summary.episodes.append(EpisodeLog(eps, steps, score, clipped, True))
                eps = epsilons[len(summary.episodes) % len(epsilons)]
                steps, score, clipped = 0, 0.0, 0.0
                next_obs, _ = env.reset()
            elif done_steps == transitions:
                summary.episodes.append(EpisodeLog(eps, steps, score, clipped, False))
            obs = next_obs
    buffer.log_final()
    env.close()
    summary.checkpoints, summary.skipped_logs = buffer.log_count, buffer.skipped_logs
    return summary


def main(argv: list[str] | None = None) -> int:
    """``python -m data_pipeline.collect_atari GAME --output DIR [--transitions N --seed S --capacity C ...]``"""
    import argparse

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("game", help="ALE game name, e.g. Breakout, Pong")
    p.add_argument("--output", required=True, help="folder that receives <Game>/<run>/replay_logs")
    p.add_argument("--transitions", type=int, default=100_000, help="agent steps to play")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--capacity", type=int, default=10_000, help="rows per checkpoint (DQN-Replay: 1,000,000)")
    p.add_argument("--run", type=int, default=1, help="run folder number")
    p.add_argument("--epsilons", type=float, nargs="+", default=list(EPSILONS),
                   help="random-action probabilities cycled episode by episode")
    args = p.parse_args(argv)
    if args.transitions <= 0 or args.capacity < 5:
        p.error("--transitions must be positive and --capacity at least 5")
    log_dir = collect_atari(args.game, args.output, args.transitions, args.seed, capacity=args.capacity,
                            run=args.run, epsilons=tuple(args.epsilons))
    print(f"wrote {log_dir}")
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main())
