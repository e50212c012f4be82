"""Run the framing fuzz harness without atheris: its corpus, then seeded random inputs."""

from __future__ import annotations

import importlib.util
import random
from collections.abc import Callable
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
HARNESS = ROOT / "fuzz" / "fuzz_framing.py"
CORPUS = ROOT / "fuzz" / "corpus" / "framing"
INPUTS = 20_000  # a second or two; the real fuzzer runs far more (fuzz/README.md)


@pytest.fixture(scope="module")
def test_one_input() -> Callable[[bytes], None]:
    spec = importlib.util.spec_from_file_location("fuzz_framing", HARNESS)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    function: Callable[[bytes], None] = module.TestOneInput
    return function


def test_harness_over_the_corpus(test_one_input: Callable[[bytes], None]) -> None:
    for path in sorted(CORPUS.iterdir()):
        test_one_input(path.read_bytes())


def test_harness_over_seeded_inputs(test_one_input: Callable[[bytes], None]) -> None:
    rng = random.Random(20261202)
    alphabet = b"\n\r\0:,0123456789ab\x00\x01\x02\x05\x10\xff"
    for _ in range(INPUTS):
        body = bytes(rng.choice(alphabet) for _ in range(rng.randint(0, 40)))
        test_one_input(bytes([rng.randrange(256), rng.randrange(256)]) + body)
