"""The streaming loader on real shards (collected from real envs, written by data_pipeline/shard.py)."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
import webdataset as wds

from mambadm import data as D
from mambadm.checkpoint import resolve_resume
from mambadm.config import load_config
from mambadm.model.base import batch_states
from tests.real_shards import REPO, real_shards


@pytest.fixture(scope="session")
def hopper(tmp_path_factory):
    return real_shards(tmp_path_factory.getbasetemp(), "hopper", 3000, 300)


@pytest.fixture(scope="session")
def breakout(tmp_path_factory):
    return real_shards(tmp_path_factory.getbasetemp(), "breakout", 1500, 300)


def cfg_for(shards, *overrides):
    return load_config(None, [f"data.shards={shards}", "data.num_workers=0", "data.batch_size=8", *overrides]).data


def episodes_of(index):
    """Every decoded episode of the shards, in index order."""
    return [D.decode(raw) for raw in wds.WebDataset([s["path"] for s in index["shards"]], shardshuffle=False)]


def first_sample(shard_dir):
    index = D.read_index(shard_dir)
    raw = next(iter(wds.WebDataset(index["shards"][0]["path"], shardshuffle=False)))
    return index, D.decode(raw)


def test_read_index_errors_name_the_file(tmp_path):
    with pytest.raises(D.DataError, match="index.json: not found"):
        D.read_index(tmp_path)
    (tmp_path / "index.json").write_text(json.dumps({"format_version": 2}))
    with pytest.raises(D.DataError, match="missing keys"):
        D.read_index(tmp_path)


def test_a_version_1_folder_fails_at_once_naming_the_version_and_the_reshard_command(hopper, tmp_path):
    """The index of a version-1 shard folder (chunked, uncompressed), as the old sharder wrote it."""
    index = json.loads((hopper / "index.json").read_text())
    old = {**index, "format_version": 1, "chunking": {"stride": 100, "max_window": 120, "frame_context": 0},
           "command": "python data_pipeline/shard.py --source d4rl --input raw.hdf5 --output old --max-window 120"}
    del old["encoding"]
    (tmp_path / "index.json").write_text(json.dumps(old))
    with pytest.raises(D.DataError) as e:
        D.read_index(tmp_path)
    message = str(e.value)
    assert "format_version 1" in message and "reads only format_version 2" in message
    assert f"python data_pipeline/shard.py --source d4rl --input INPUT --output {tmp_path}" in message
    assert old["command"] in message
    out = subprocess.run([sys.executable, "data_pipeline/shard.py", "--output", str(tmp_path), "--verify"],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 1 and "format_version 1" in out.stderr and "--output" in out.stderr


def test_subsets_are_nested_and_validation_is_held_out(hopper):
    index = D.read_index(hopper)
    small_t, small_v = D.select_shards(index, cfg_for(hopper, "data.subset_transitions=600", "data.val_shards=2"))
    big_t, big_v = D.select_shards(index, cfg_for(hopper, "data.subset_transitions=1200", "data.val_shards=2"))
    names = lambda shards: [s["name"] for s in shards]  # noqa: E731
    assert names(big_t)[:len(small_t)] == names(small_t) and len(big_t) > len(small_t)
    assert D.transitions_of(small_t) >= 600 and D.transitions_of(small_t[:-1]) < 600
    assert names(small_v) == names(big_v) and not set(names(big_v)) & set(names(big_t))
    all_t, _ = D.select_shards(index, cfg_for(hopper, "data.val_shards=2"))
    assert len(all_t) == len(index["shards"]) - 2
    other, _ = D.select_shards(index, cfg_for(hopper, "data.subset_transitions=600", "data.subset_seed=1"))
    assert names(other) != names(small_t)  # the permutation follows the seed
    with pytest.raises(D.DataError, match="hold only"):
        D.select_shards(index, cfg_for(hopper, "data.subset_transitions=999999"))


def test_vector_windows_normalised_scaled_and_padded(hopper):
    index, episode = first_sample(hopper)
    cfg = cfg_for(hopper, "data.context_len=20", "data.rtg_scale=1000")
    maker = D.WindowMaker(index, cfg)
    w = maker.window(episode, 5)
    mean, std = np.array(index["state_mean"]), np.array(index["state_std"])
    np.testing.assert_allclose(w["states"], (episode["obs"][5:25] - mean) / (std + 1e-6), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(w["rtg"], episode["rtg"][5:25] / 1000, rtol=1e-6)
    assert w["mask"].all() and w["timesteps"].tolist() == list(range(5, 25))
    # the last step of an episode: one real step, the rest padded and masked
    w = maker.window(episode, episode["meta"]["episode_length"] - 1)
    assert w["mask"].tolist() == [True] + [False] * 19 and (w["states"][1:] == 0).all()
    # any context length: a window longer than the episode is padded (no max_window in version-2 shards)
    long = D.WindowMaker(index, cfg_for(hopper, "data.context_len=1500")).window(episode, 0)
    assert long["mask"].sum() == episode["meta"]["episode_length"] < 1500


def test_atari_frames_stacked_at_load_time_with_zeros_before_the_start(breakout):
    index, episode = first_sample(breakout)
    maker = D.WindowMaker(index, cfg_for(breakout, "data.context_len=8"))
    batch = maker.collate([(episode, 0), (episode, 5)])
    assert "states" not in batch and batch["frames"].shape == (2, 11, 84, 84)  # shipped unstacked: K + 3 frames
    states = batch_states(batch, 4)  # what the model reads
    assert states.shape == (2, 8, 4, 84, 84) and states.dtype == torch.uint8
    obs = torch.from_numpy(episode["obs"].copy())
    assert (states[0, 0, :3] == 0).all() and torch.equal(states[0, 0, 3], obs[0])
    for t in range(8):  # step t of the window starting at 5 stacks frames t+2 .. t+5
        assert torch.equal(states[1, t], obs[5 + t - 3:5 + t + 1])
    assert batch["actions"].dtype == torch.int64 and batch["mask"].all()


def exact_windows(shards, index, cfg, rank, world, workers):
    loader = D.make_loader(shards, index, cfg, rank, world, seed=0, exact=True, num_workers=workers)
    return [(float(r), int(t)) for b in loader for r, t in zip(b["rtg"][:, 0], b["timesteps"][:, 0])]


def test_exact_pass_splits_by_rank_and_worker_and_covers_every_start_once(hopper):
    index = D.read_index(hopper)
    cfg = cfg_for(hopper, "data.context_len=10")
    shards = index["shards"]
    whole = exact_windows(shards, index, cfg, 0, 1, 0)
    assert len(whole) == D.transitions_of(shards)
    parts = [exact_windows(shards, index, cfg, r, 2, 2) for r in range(2)]
    assert sorted(parts[0] + parts[1]) == sorted(whole) and parts[0] and parts[1]
    with pytest.raises(D.DataError, match="at least one shard per rank and worker"):
        exact_windows(shards[:1], index, cfg, 0, 2, 0)


def batches(loader, n):
    it = iter(loader)
    return [next(it) for _ in range(n)]


def test_training_stream_is_a_pure_function_of_seed_and_rank(hopper):
    index = D.read_index(hopper)
    cfg = cfg_for(hopper, "data.context_len=10", "data.shuffle_buffer=50")
    make = lambda rank, seed: D.make_loader(index["shards"], index, cfg, rank, 2, seed, exact=False)  # noqa: E731
    a, again = batches(make(0, 7), 6), batches(make(0, 7), 6)
    for x, y in zip(a, again):
        assert all(torch.equal(x[k], y[k]) for k in x)
    other_rank, other_seed = batches(make(1, 7), 6), batches(make(0, 8), 6)
    assert not torch.equal(a[0]["rtg"], other_rank[0]["rtg"])
    assert not torch.equal(a[0]["rtg"], other_seed[0]["rtg"])


def test_resume_ignores_tmp_and_incomplete_checkpoints(tmp_path):
    ckpts = tmp_path / "checkpoints"
    (ckpts / "step-00000010").mkdir(parents=True)
    (ckpts / "step-00000010" / "trainer_state.json").write_text("{}")
    (ckpts / "step-00000020").mkdir()  # no trainer state: incomplete
    (ckpts / "tmp-step-00000030").mkdir()
    (ckpts / "tmp-step-00000030" / "trainer_state.json").write_text("{}")
    assert resolve_resume(tmp_path, "auto").name == "step-00000010"
    assert resolve_resume(tmp_path, "never") is None
    with pytest.raises(FileNotFoundError):
        resolve_resume(tmp_path, str(ckpts / "tmp-step-00000030"))


def windows_by_definition(maker, refs):
    """The batch ``collate`` must produce, stacked from the readable per-window definition."""
    windows = [maker.window(episode, start) for episode, start in refs]
    stacked = {key: torch.from_numpy(np.stack([w[key] for w in windows])) for key in windows[0]}
    stacked["frames" if maker.atari else "states"] = stacked.pop("states")
    return stacked


@pytest.mark.parametrize("data", ["hopper", "breakout"])
def test_collate_writes_the_windows_the_readable_path_defines(data, request):
    shards = request.getfixturevalue(data)
    index = D.read_index(shards)
    episodes = episodes_of(index)
    rng = np.random.default_rng(0)
    for k in (1, 7, 30):
        maker = D.WindowMaker(index, cfg_for(shards, f"data.context_len={k}", "data.rtg_scale=7"))
        refs = [(ep, start) for ep in episodes[:3] for start in (0, 1, 2, len(ep["actions"]) - 1)]
        refs += [(ep, int(rng.integers(len(ep["actions"])))) for ep in rng.choice(episodes, 20)]
        fast, readable = maker.collate(refs), windows_by_definition(maker, refs)
        assert fast.keys() == readable.keys()
        for key in fast:
            assert fast[key].dtype == readable[key].dtype and torch.equal(fast[key], readable[key]), (k, key)


def test_exact_pass_serves_every_window_of_every_episode_as_defined(breakout):
    """The windows of version-1 shards for the same data (every owned start once, each window cut as ``window``
    defines it) are the exact pass over version-2 shards: every step of every episode, in shard order."""
    index = D.read_index(breakout)
    cfg = cfg_for(breakout, "data.context_len=30", "data.batch_size=64")
    maker = D.WindowMaker(index, cfg)
    served = list(D.make_loader(index["shards"], index, cfg, 0, 1, seed=0, exact=True, num_workers=1))
    refs = [(ep, t) for ep in episodes_of(index) for t in range(len(ep["actions"]))]
    assert sum(len(b["mask"]) for b in served) == len(refs) == index["totals"]["transitions"]
    for i, batch in enumerate(served):
        expected = windows_by_definition(maker, refs[i * 64:(i + 1) * 64])
        for key in expected:
            assert torch.equal(batch[key], expected[key]), (i, key)


def rewrite_member(src, dst, member_suffix, damage):
    """A copy of the tar ``src`` whose first member ending in ``member_suffix`` has its bytes passed through
    ``damage`` (a valid tar around a damaged compressed member)."""
    import io
    import tarfile

    done = False
    with tarfile.open(src) as tin, tarfile.open(dst, "w", format=tarfile.USTAR_FORMAT) as tout:
        for info in tin:
            data = tin.extractfile(info).read()
            if not done and info.name.endswith(member_suffix):
                data, done = damage(data), True
            info.size = len(data)
            tout.addfile(info, io.BytesIO(data))
    assert done


@pytest.mark.parametrize("damage", [lambda b: b[:len(b) // 2],  # truncated
                                    lambda b: b[:len(b) // 2] + bytes([b[len(b) // 2] ^ 0x55]) + b[len(b) // 2 + 1:]])
def test_a_damaged_compressed_member_names_its_shard(breakout, tmp_path, damage):
    index = D.read_index(breakout)
    shard = index["shards"][0]
    bad = tmp_path / shard["name"]
    rewrite_member(shard["path"], bad, "obs.npy.zst", damage)
    cfg = cfg_for(breakout, "data.context_len=8")
    loader = D.make_loader([{**shard, "path": str(bad)}], index, cfg, 0, 1, seed=0, exact=True, num_workers=0)
    with pytest.raises(D.DataError, match=f"{bad}: sample e[0-9]+, member obs.npy.zst: damaged compressed member"):
        list(loader)


def test_training_windows_are_uniform_over_transitions_and_mixed_across_episodes(hopper):
    """The pool serves each episode windows in proportion to its length (up to the shards' resampling noise), and a
    batch mixes several episodes."""
    index = D.read_index(hopper)
    cfg = cfg_for(hopper, "data.context_len=4", "data.batch_size=64", "data.shuffle_buffer=100")
    loader = D.make_loader(index["shards"], index, cfg, 0, 1, seed=3, exact=False, num_workers=0)
    loader.collate_fn = lambda refs: [(ep["meta"]["episode_id"], ep["meta"]["episode_length"]) for ep, _ in refs]
    batches = batches_of(loader, 300)
    counts, lengths = {}, {}
    for batch in batches:
        for episode, length in batch:
            counts[episode] = counts.get(episode, 0) + 1
            lengths[episode] = length
    episodes = sorted(counts)
    assert len(episodes) == index["totals"]["episodes"]  # every episode served
    share = np.array([counts[e] for e in episodes]) / sum(counts.values())
    expected = np.array([lengths[e] for e in episodes]) / sum(lengths.values())
    assert np.abs(share - expected).max() < 0.05, (share, expected)
    assert np.mean([len({e for e, _ in b}) for b in batches]) >= 3


def batches_of(loader, n):
    it = iter(loader)
    return [next(it) for _ in range(n)]


def test_shifted_windows_end_at_the_episode_end_and_padded_ones_run_past_it(hopper):
    """data.window_cut: the same random draws, moved back to end at the episode end (DT's Atari cut) or kept and
    padded; an episode shorter than K is one padded window either way; validation is padded in both modes."""
    index = D.read_index(hopper)
    k = 40
    starts = {}
    for cut in ("padded", "shifted"):
        cfg = cfg_for(hopper, f"data.context_len={k}", "data.batch_size=32", f"data.window_cut={cut}")
        loader = D.make_loader(index["shards"], index, cfg, 0, 1, seed=5, exact=False, num_workers=0)
        loader.collate_fn = lambda refs: [(len(ep["actions"]), s) for ep, s in refs]
        starts[cut] = [w for b in batches_of(loader, 40) for w in b]
    assert [t for t, _ in starts["padded"]] == [t for t, _ in starts["shifted"]]  # same episodes drawn
    crossing = 0
    for (length, padded), (_, shifted) in zip(starts["padded"], starts["shifted"]):
        if padded + k <= length:
            assert shifted == padded
        else:
            crossing += 1
            assert shifted == max(0, length - k) and (length < k or shifted + k == length)
    assert crossing > 10  # the draws reached the episode ends often enough to test the cut
    with pytest.raises(Exception, match="window_cut"):
        cfg_for(hopper, "data.window_cut=left")
    # the shifted cut moves whole windows: the batch it collates is fully real (mask all true) where the episode
    # is at least K long
    cfg = cfg_for(hopper, f"data.context_len={k}", "data.window_cut=shifted")
    maker = D.WindowMaker(index, cfg)
    episode = max(episodes_of(index), key=lambda e: len(e["actions"]))
    length = len(episode["actions"])
    assert length >= k
    batch = maker.collate([(episode, maker.training_start(length - 1, length))])
    assert batch["mask"].all() and int(batch["timesteps"][0, -1]) == length - 1


def test_workers_reuse_freed_batch_buffers_and_never_overwrite_a_held_batch(breakout, monkeypatch):
    """Loader workers hand batches over in reused shared-memory slots (mambadm/batch_slots.py): a consumer that drops
    each batch lets the worker reuse a few buffers; one that keeps every batch gets its own numbers in each, equal
    to the in-process stream's."""
    from mambadm import batch_slots

    allocations = torch.zeros(1, dtype=torch.int64).share_memory_()  # counted in the forked worker
    real = batch_slots.shared_tensor

    def counted(shape, dtype):
        allocations.add_(1)
        return real(shape, dtype)

    monkeypatch.setattr(batch_slots, "shared_tensor", counted)
    index = D.read_index(breakout)
    cfg = cfg_for(breakout, "data.context_len=8", "data.batch_size=16", "data.shuffle_buffer=50")
    make = lambda workers: D.make_loader(index["shards"], index, cfg, 0, 1, seed=2, exact=False,  # noqa: E731
                                         num_workers=workers)
    n, tensors_per_batch = 40, 5
    reference = batches_of(make(0), n)
    held = batches_of(make(1), n)  # every batch kept: no slot can be handed back
    assert "_slot" not in held[0]
    for a, b in zip(reference, held):
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert allocations.item() >= n * tensors_per_batch
    allocations.zero_()
    stream, sums = iter(make(1)), []
    for _ in range(n):
        batch = next(stream)
        sums.append(float(batch["frames"].float().sum()))
        del batch
    del stream
    assert sums == [float(b["frames"].float().sum()) for b in reference]
    assert allocations.item() <= batch_slots.SLOTS_PER_WORKER * tensors_per_batch < n * tensors_per_batch


def test_val_stride_spreads_a_validation_budget_over_every_episode(hopper):
    """data.val_stride: the exact pass starts a window at every s-th step of every episode, so the first few batches
    of validation reach all validation episodes instead of the first one; stride 1 is every step."""
    index = D.read_index(hopper)
    shards = index["shards"]
    every = exact_windows(shards, index, cfg_for(hopper, "data.context_len=10"), 0, 1, 0)
    strided = exact_windows(shards, index, cfg_for(hopper, "data.context_len=10", "data.val_stride=7"), 0, 1, 0)
    lengths = [len(e["actions"]) for e in episodes_of(index)]
    assert len(strided) == sum(-(-n // 7) for n in lengths) < len(every)
    assert {t % 7 for _, t in strided} == {0}  # timesteps start at 0 in every episode
    assert set(strided) <= set(every)
    with pytest.raises(D.DataError, match="val_stride"):
        D.WindowMaker(index, cfg_for(hopper, "data.val_stride=0"))
