"""What a sampling run keys its random numbers by, recorded while it runs (the engine's and the cached
sampler's tests).

A run's randomness is counter-based (radd_fast/philox.py): the head draws each revealed token's Gumbel
noise from Philox(key, noise id), the reveal schedule each sample's uniforms from Philox(key, sample
index). Two draws that share (key, id) share their numbers, so noise repeated between waves, splits
(``first_index``: ranks, chunks of sample.py), cached evaluations or streams is a repeated pair here,
whatever shows in the tokens. ``record_noise`` wraps the one head method every sampler path draws
through (``RevealSampler.sample_at``, the fused kernel's and the torch head's alike), the engine's
schedule draw (``keyed_uniforms``) and its stream keys (``noise_key``).
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from radd_fast.model.head import RevealSampler
from radd_fast.sampling import engine


@dataclass
class NoiseLog:
    """head: (key, id) of every revealed token's noise; schedule: (key, sample index) of every schedule row;
    streams: (seed, stream, key) of every stream key the engine derived."""

    head: list = field(default_factory=list)
    schedule: list = field(default_factory=list)
    streams: list = field(default_factory=list)

    def clear(self) -> None:
        self.head.clear()
        self.schedule.clear()
        self.streams.clear()


def record_noise(monkeypatch, mask_id: int) -> NoiseLog:
    """Record, until the test ends, the noise of every head row that reveals a position (its cell holds
    MASK until then; padded head rows write the trash cell) and every schedule row and stream key."""
    log = NoiseLog()
    sample_at, keyed_uniforms, noise_key = RevealSampler.sample_at, engine.keyed_uniforms, engine.noise_key

    def recording_sample_at(self, h_rows, dst, x_flat, strategy, key, noise_ids):
        real = x_flat[dst] == mask_id
        log.head += [(int(key), int(i)) for i in noise_ids[real].tolist()]
        return sample_at(self, h_rows, dst, x_flat, strategy, key, noise_ids)

    def recording_uniforms(key, ids, width, *args, **kwargs):
        log.schedule += [(int(key), int(i)) for i in ids.reshape(-1).tolist()]
        return keyed_uniforms(key, ids, width, *args, **kwargs)

    def recording_noise_key(seed, stream):
        key = noise_key(seed, stream)
        log.streams.append((int(seed), int(stream), int(key)))
        return key

    monkeypatch.setattr(RevealSampler, "sample_at", recording_sample_at)
    monkeypatch.setattr(engine, "keyed_uniforms", recording_uniforms)
    monkeypatch.setattr(engine, "noise_key", recording_noise_key)
    return log


def repeated(pairs: list) -> list:
    """The (key, id) pairs drawn more than once, with their counts (a few, for the message)."""
    return [(pair, n) for pair, n in Counter(pairs).most_common(5) if n > 1]


def assert_fresh_noise(log: NoiseLog, tokens: int, samples: int, name: str) -> None:
    """Every revealed token drew noise of its own, every sample a schedule row of its own, and the head's
    and the schedule's streams have different keys (a shared key would pair a token's noise with another
    sample's schedule); tokens / samples: how many the runs recorded in ``log`` revealed / planned."""
    assert len(log.head) == tokens, f"{name}: {len(log.head)} head rows revealed a position, expected {tokens}"
    assert not repeated(log.head), f"{name}: head noise drawn twice, (key, id) x count: {repeated(log.head)}"
    if log.schedule:  # a fixed order (ordered, left_to_right) draws no schedule
        assert len(log.schedule) == samples, f"{name}: {len(log.schedule)} schedule rows for {samples} samples"
        assert not repeated(log.schedule), f"{name}: a schedule row drawn twice: {repeated(log.schedule)}"
    shared = {k for k, _ in log.head} & {k for k, _ in log.schedule}
    assert not shared, f"{name}: the head and the reveal schedule draw with the same key {sorted(shared)}"
    keys = [key for _, _, key in log.streams]
    assert len(set(keys)) == len(set((seed, stream) for seed, stream, _ in log.streams)), \
        f"{name}: two (seed, stream) pairs derived one key: {log.streams}"
