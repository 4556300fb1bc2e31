"""Checkpoints: round trip, weights_only safety, atomic writes, clear errors, RNG state."""

from __future__ import annotations

import pathlib
import random
from collections import OrderedDict

import numpy as np
import pytest
import torch

from vaeflow.run.checkpoint import (
    CheckpointError,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
    validate_state,
)


def _trained_state() -> tuple[torch.nn.Module, torch.optim.Optimizer, dict]:
    """A small model and an Adam optimiser after one step (so it has moment buffers)."""
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, betas=(0.9, 0.99))
    model(torch.randn(5, 4)).pow(2).sum().backward()
    opt.step()
    state = {
        "model": model.state_dict(),
        "optimizer": opt.state_dict(),
        "step": 17,
        "config": {
            "model": {"posterior": {"flow": "iaf", "num_layers": 4, "options": {}}},
            "train": {"lr": 1e-3, "betas": [0.9, 0.99], "amp": False, "resume": None},
            "run": {"name": "mnist_iaf", "tags": ("a", "b")},
        },
        "rng": rng_state(),
    }
    return model, opt, state


def test_round_trip_restores_model_optimizer_config_and_step(tmp_path: pathlib.Path) -> None:
    model, opt, state = _trained_state()
    path = tmp_path / "checkpoints" / "last.pt"  # parent does not exist yet
    save_checkpoint(path, state)
    loaded = load_checkpoint(path, required=("model", "optimizer", "step", "config", "rng"))

    assert loaded["step"] == 17
    assert loaded["config"] == state["config"]
    for key, value in state["model"].items():
        assert torch.equal(loaded["model"][key], value), key

    fresh = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
    fresh.load_state_dict(loaded["model"])
    fresh_opt = torch.optim.Adam(fresh.parameters(), lr=0.5)
    fresh_opt.load_state_dict(loaded["optimizer"])
    assert fresh_opt.param_groups[0]["lr"] == 1e-3
    assert fresh_opt.param_groups[0]["betas"] == (0.9, 0.99)
    # One more identical step on both gives identical weights: the Adam moments survived.
    x = torch.randn(3, 4)
    for m, o in ((model, opt), (fresh, fresh_opt)):
        o.zero_grad()
        m(x).pow(2).sum().backward()
        o.step()
    for a, b in zip(model.parameters(), fresh.parameters(), strict=True):
        assert torch.equal(a, b)
    assert [p.name for p in path.parent.iterdir()] == ["last.pt"]  # no temp file left


def test_plain_torch_load_with_weights_only_reads_a_saved_checkpoint(
    tmp_path: pathlib.Path,
) -> None:
    _, _, state = _trained_state()
    save_checkpoint(tmp_path / "c.pt", state)
    loaded = torch.load(tmp_path / "c.pt", weights_only=True)
    assert loaded["config"] == state["config"]


class _Exploit:
    """Unpickling this would create a marker file: proof that code ran at load time."""

    def __init__(self, marker: pathlib.Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


def test_pickled_objects_are_refused_not_executed(tmp_path: pathlib.Path) -> None:
    marker = tmp_path / "code_ran"
    path = tmp_path / "evil.pt"
    torch.save({"model": {}, "payload": _Exploit(marker)}, path)  # plain torch.save pickles it
    with pytest.raises(CheckpointError, match="refusing to load") as info:
        load_checkpoint(path)
    assert str(path) in str(info.value)
    assert "save_checkpoint" in str(info.value)
    assert not marker.exists()


@pytest.mark.parametrize("error", [OSError("No space left on device"), KeyboardInterrupt()])
def test_crash_mid_write_keeps_previous_checkpoint_and_no_temp_file(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch, error: BaseException
) -> None:
    path = tmp_path / "last.pt"
    save_checkpoint(path, {"step": 1, "w": torch.arange(5.0)})
    before = path.read_bytes()

    def crashing_save(obj, f, *args, **kwargs) -> None:
        f.write(b"PK\x03\x04 half a zip archive")  # partial bytes reach the temp file
        raise error

    monkeypatch.setattr(torch, "save", crashing_save)
    with pytest.raises(type(error)):
        save_checkpoint(path, {"step": 2, "w": torch.zeros(5)})
    monkeypatch.undo()

    assert path.read_bytes() == before
    assert load_checkpoint(path)["step"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]


def test_unsaveable_objects_are_named_by_key_path_and_nothing_is_written(
    tmp_path: pathlib.Path,
) -> None:
    path = tmp_path / "c.pt"
    cases = [
        ({"config": {"x": pathlib.Path("a")}}, r"state\['config'\]\['x'\] is a <class 'pathlib"),
        ({"config": {"lr": np.float64(0.1)}}, r"state\['config'\]\['lr'\] is a .*numpy.float64"),
        ({"m": [0, torch.nn.Linear(2, 2)]}, r"state\['m'\]\[1\] is a .*Linear.*state_dict"),
        ({"a": np.zeros(3)}, r"state\['a'\] is a .*ndarray.*from_numpy"),
        ({"s": {1, 2}}, r"state\['s'\] is a <class 'set'>"),
        ({"d": {(1, 2): 3}}, r"state\['d'\] has a key \(1, 2\)"),
    ]
    for state, pattern in cases:
        with pytest.raises(TypeError, match=pattern):
            save_checkpoint(path, state)
    assert not path.exists()
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(TypeError, match="must be a dict"):
        validate_state([1, 2])  # type: ignore[arg-type]


def test_validate_accepts_everything_a_training_state_holds() -> None:
    shared = [1, 2]
    loop: dict = {"self": None}
    loop["self"] = loop  # a cycle must not hang the walk
    validate_state(
        {
            "od": OrderedDict(a=torch.ones(1)),
            "param": torch.nn.Parameter(torch.ones(1)),
            "misc": (None, True, 1, 1.5, 1j, "s", b"b", torch.float32, torch.device("cpu")),
            "size": torch.Size([2, 3]),
            "twice": [shared, shared],
            "loop": loop,
        }
    )


def test_truncated_checkpoint_is_reported_as_corrupt_or_truncated(
    tmp_path: pathlib.Path,
) -> None:
    _, _, state = _trained_state()
    good = tmp_path / "good.pt"
    save_checkpoint(good, state)
    data = good.read_bytes()
    for fraction in (0.1, 0.5, 0.9):
        path = tmp_path / "last.pt"
        path.write_bytes(data[: int(len(data) * fraction)])
        with pytest.raises(CheckpointError, match="corrupt or truncated") as info:
            load_checkpoint(path)
        message = str(info.value)
        assert str(path) in message
        assert "best.pt" in message  # points at the other checkpoint
        assert "--resume" in message


@pytest.mark.parametrize(
    "garbage",
    [bytes(range(256)) * 4, b"this is not a checkpoint\n" * 20, b""],
    ids=["binary", "text", "empty"],
)
def test_garbage_bytes_are_reported_as_corrupt_or_truncated(
    tmp_path: pathlib.Path, garbage: bytes
) -> None:
    path = tmp_path / "best.pt"
    path.write_bytes(garbage)
    with pytest.raises(CheckpointError, match="corrupt or truncated") as info:
        load_checkpoint(path)
    assert str(path) in str(info.value)
    assert "last.pt" in str(info.value)


def test_missing_file_says_what_to_do(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "checkpoints" / "last.pt"
    with pytest.raises(CheckpointError, match="does not exist") as info:
        load_checkpoint(path)
    assert str(path) in str(info.value)
    assert "RUN_DIR" in str(info.value)
    assert "without --resume" in str(info.value)
    assert isinstance(info.value, RuntimeError)


def test_missing_required_keys_are_listed(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "c.pt"
    save_checkpoint(path, {"model": {}, "step": 3})
    with pytest.raises(CheckpointError, match=r"lacks required keys \['optimizer', 'rng'\]"):
        load_checkpoint(path, required=["model", "optimizer", "step", "rng"])
    assert load_checkpoint(path, required=["model", "step"])["step"] == 3


def test_a_non_dict_checkpoint_is_refused(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "c.pt"
    torch.save([torch.ones(2)], path)
    with pytest.raises(CheckpointError, match="not a dict"):
        load_checkpoint(path)


def _draw() -> tuple:
    """Numbers from every global generator, including the cached-Gaussian paths."""
    return (
        [random.random() for _ in range(3)],
        random.gauss(0.0, 1.0),
        np.random.rand(3).tolist(),
        np.random.randn(3).tolist(),
        torch.rand(3).tolist(),
        torch.randn(3).tolist(),
    )


def test_rng_round_trip_reproduces_random_numpy_and_torch(tmp_path: pathlib.Path) -> None:
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    # Leave a cached Gaussian in both random and numpy so that part of the state matters.
    random.gauss(0.0, 1.0)
    np.random.randn(1)
    save_checkpoint(tmp_path / "c.pt", {"rng": rng_state()})
    expected = _draw()

    random.seed(99)
    np.random.seed(99)
    torch.manual_seed(99)
    assert _draw() != expected  # reseeding really changed the streams

    set_rng_state(load_checkpoint(tmp_path / "c.pt")["rng"])
    assert _draw() == expected


def test_rng_state_errors_and_cuda_mismatch_warning() -> None:
    state = rng_state()
    with pytest.raises(ValueError, match=r"lacks \['numpy'\].*rng_state\(\)"):
        set_rng_state({k: v for k, v in state.items() if k != "numpy"})
    with pytest.raises(ValueError, match="malformed RNG state"):
        set_rng_state({**state, "torch": "not a tensor"})
    # One more CUDA generator than this machine has: the rest restores, with a warning.
    extra = {**state, "cuda": [*state["cuda"], torch.zeros(16, dtype=torch.uint8)]}
    expected = torch.rand(2)
    with pytest.warns(UserWarning, match="CUDA generator"):
        set_rng_state(extra)
    assert torch.equal(torch.rand(2), expected)
