"""checkpointing.layout's one checkpoint-path resolver, used by training (--ckpt-step), the
converter and the evaluator (--iteration): an explicit iteration is never ignored."""

from pathlib import Path

import pytest

from megatron_sed.checkpointing import layout
from megatron_sed.eval.loading import resolve_checkpoint_dir


def _ckpt(d: Path) -> Path:
    d.mkdir(parents=True)
    (d / ".metadata").write_bytes(b"")
    return d


@pytest.fixture
def save(tmp_path):
    root = tmp_path / "save"
    for it in (0, 3, 6):
        _ckpt(layout.iteration_dir(root, it))
    (root / layout.TRACKER).write_text("6\n")
    return root


def test_tracker_or_the_explicit_iteration(save):
    assert layout.resolve_dist_ckpt_dir(save) == save / "iter_0000006"
    assert layout.resolve_dist_ckpt_dir(save, 3) == save / "iter_0000003"
    assert layout.resolve_dist_ckpt_dir(save, 0) == save / "iter_0000000"
    assert layout.resolve_dist_ckpt_dir(save / "iter_0000003") == save / "iter_0000003"
    # the evaluator resolves through the same function
    for it in (None, 3, 0):
        assert resolve_checkpoint_dir(str(save), it) == layout.resolve_dist_ckpt_dir(save, it)


def test_explicit_iteration_is_never_ignored(save):
    """A checkpoint dir given with an iteration used to resolve to itself in layout (the
    iteration silently dropped) but be refused by the evaluator's own copy."""
    ckpt = save / "iter_0000003"
    with pytest.raises(FileNotFoundError, match=r"--ckpt-step 3: .*iter_0000003.* not a torch_dist"):
        layout.resolve_dist_ckpt_dir(ckpt, 3)
    with pytest.raises(layout.CheckpointError, match=r"--load .*: --iteration 9: .*iter_0000009"):
        resolve_checkpoint_dir(str(save), 9)
    with pytest.raises(layout.CheckpointError, match=r"--ckpt-step 9: "):  # the RL CLI's flag
        resolve_checkpoint_dir(str(save), 9, flag="--ckpt-step")
    with pytest.raises(layout.CheckpointError, match="no such file or directory"):
        resolve_checkpoint_dir(str(save / "missing"))


def test_ckpt_step_zero_means_the_tracker(save, monkeypatch):
    """Megatron's loader reads --ckpt-step 0 as unset (`if args.ckpt_step:`): so does the
    read of the checkpoint's args that training and calibration check against."""
    seen = []
    monkeypatch.setattr(layout, "read_common_state", lambda d: seen.append(d) or {})
    layout.read_checkpoint_args(save, 0)
    layout.read_checkpoint_args(save, 3)
    assert seen == [save / "iter_0000006", save / "iter_0000003"]
