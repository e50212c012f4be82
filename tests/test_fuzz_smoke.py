"""Run the PROXY protocol fuzz harness without atheris: its corpus, then seeded mutations."""

from __future__ import annotations

import importlib.util
import random
from collections.abc import Callable
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
HARNESS = ROOT / "fuzz" / "fuzz_proxy_protocol.py"
CORPUS = ROOT / "fuzz" / "corpus" / "proxy"
MUTATIONS = 30_000  # about a second; the real fuzzer runs far more (fuzz/README.md)


@pytest.fixture(scope="module")
def test_one_input() -> Callable[[bytes], None]:
    spec = importlib.util.spec_from_file_location("fuzz_proxy_protocol", HARNESS)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    function: Callable[[bytes], None] = module.TestOneInput
    return function


def corpus() -> list[bytes]:
    return [path.read_bytes() for path in sorted(CORPUS.iterdir())]


def mutate(rng: random.Random, data: bytes, seeds: list[bytes]) -> bytes:
    """A few libFuzzer-like edits: flip, set, insert, delete, truncate, splice."""
    out = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        where = rng.randint(0, len(out))
        choice = rng.randrange(7)
        if choice == 0 and out:
            out[min(where, len(out) - 1)] ^= 1 << rng.randrange(8)
        elif choice == 1 and out:
            out[min(where, len(out) - 1)] = rng.choice([0, 0x0A, 0x0D, 0x20, 0x7F, 0xFF])
        elif choice == 2:
            out[where:where] = rng.randbytes(rng.randint(1, 8))
        elif choice == 3:
            del out[where : where + rng.randint(1, 16)]
        elif choice == 4:
            del out[where:]
        elif choice == 5:
            other = rng.choice(seeds)
            out[where:] = other[rng.randint(0, len(other)) :]
        else:  # an interesting length or TLV size, big-endian, as the v2 header stores them
            value = rng.choice([0, 1, 2, 3, 12, 36, 216, 4096, 4097, 0xFFFF])
            out[where : where + 2] = value.to_bytes(2, "big")
    return bytes(out)


def test_corpus_is_seeded_from_the_vectors() -> None:
    vectors = {p.stem for p in (ROOT / "tests" / "vectors" / "proxy").glob("*.bin")}
    assert vectors <= {p.name for p in CORPUS.iterdir()}


def test_harness_over_the_corpus(test_one_input: Callable[[bytes], None]) -> None:
    for data in corpus():
        test_one_input(data)


def test_harness_over_seeded_mutations(test_one_input: Callable[[bytes], None]) -> None:
    rng = random.Random(20240601)
    seeds = corpus()
    for _ in range(MUTATIONS):
        test_one_input(mutate(rng, rng.choice(seeds), seeds))
