from __future__ import annotations

import os
import pickle

import pytest
import torch

from pidnet.checkpoint import load_weights, read_checkpoint, save_checkpoint
from pidnet.errors import CheckpointError
from pidnet.model import create_model


@pytest.fixture
def source():
    torch.manual_seed(1)
    return create_model("pidnet_s", num_classes=4, augment=True)


def _fresh():
    torch.manual_seed(2)
    return create_model("pidnet_s", num_classes=4, augment=True)


def _same(a, b):
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(),
                                                 b.state_dict().values()))


@pytest.mark.parametrize("layout", ["bare", "state_dict", "wrapper", "ddp", "toolkit"])
def test_every_layout_round_trips(tmp_path, source, layout):
    sd = source.state_dict()
    payload = {
        "bare": sd,
        "state_dict": {"state_dict": sd, "epoch": 3},
        "wrapper": {"state_dict": {**{f"model.{k}": v for k, v in sd.items()},
                                   "sem_loss.criterion.weight": torch.ones(4),
                                   "bd_loss.dummy": torch.zeros(1)}},
        "ddp": {f"module.{k}": v for k, v in sd.items()},
        "toolkit": {"format_version": 1, "model": sd, "epoch": 1},
    }[layout]
    torch.save(payload, tmp_path / "w.pt")
    target = _fresh()
    assert not _same(source, target)
    report = load_weights(target, tmp_path / "w.pt")
    assert _same(source, target)
    assert len(report.loaded) == len(sd) and not report.missing and not report.mismatched
    assert report.dropped == (["sem_loss.criterion.weight", "bd_loss.dummy"]
                              if layout == "wrapper" else [])


def test_training_checkpoint_into_inference_model_reports_unexpected_heads(source):
    lean = create_model("pidnet_s", num_classes=4, augment=False)
    report = load_weights(lean, source.state_dict())
    assert len(report.unexpected) == 26
    assert all(k.startswith(("seghead_p.", "seghead_d.")) for k in report.unexpected)
    assert len(report.loaded) == 453


def test_strict_refuses_truncated_dict(source):
    sd = dict(list(source.state_dict().items())[:-5])
    with pytest.raises(CheckpointError, match="missing 5"):
        load_weights(_fresh(), sd)


def test_partial_imagenet_style_weights_load_with_strict_false(source):
    sd = {k: v for k, v in source.state_dict().items() if k.startswith(("conv1.", "layer1."))}
    sd["fc.weight"] = torch.zeros(1000, 512)          # classifier of the ImageNet model
    sd["final_layer.conv2.weight"] = torch.zeros(1000, 128, 1, 1)   # wrong class count
    target = _fresh()
    report = load_weights(target, {"state_dict": sd}, strict=False)
    assert report.unexpected == ["fc.weight"]
    assert report.mismatched == ["final_layer.conv2.weight"]
    assert len(report.loaded) == len(sd) - 2
    assert torch.equal(target.conv1[0].weight, source.conv1[0].weight)
    assert "layer2.0.conv1.weight" in report.missing


def test_shape_mismatch_is_an_error_when_strict(source):
    other = create_model("pidnet_s", num_classes=7, augment=True)
    with pytest.raises(CheckpointError, match="final_layer.conv2"):
        load_weights(other, source.state_dict())


def test_save_is_atomic_and_versioned(tmp_path, source):
    path = save_checkpoint({"model": source.state_dict()}, tmp_path / "ck" / "last.pt")
    assert read_checkpoint(path)["format_version"] == 1
    assert [p.name for p in path.parent.iterdir()] == ["last.pt"]   # no temporary left


class _Exploit:
    def __reduce__(self):
        return (os.system, ("touch " + os.environ["PIDNET_EXPLOIT_MARK"],))


def test_code_in_a_pickle_is_refused_and_not_run(tmp_path, monkeypatch):
    mark = tmp_path / "pwned"
    monkeypatch.setenv("PIDNET_EXPLOIT_MARK", str(mark))
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": {}, "payload": _Exploit()}, path, pickle_protocol=2)
    with pytest.raises(CheckpointError, match="refused"):
        read_checkpoint(path)
    assert not mark.exists()
    with open(path, "wb") as f:   # a raw pickle, not a zip checkpoint
        pickle.dump(_Exploit(), f)
    with pytest.raises(CheckpointError):
        read_checkpoint(path)
    assert not mark.exists()


@pytest.mark.parametrize("content", [b"", b"hello", b"PK\x03\x04garbage"])
def test_not_a_checkpoint(tmp_path, content):
    path = tmp_path / "x.pt"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=str(path)):
        read_checkpoint(path)


def test_remove_temporaries_takes_only_what_atomic_writes_leave(tmp_path):
    from pidnet.atomic import remove_temporaries

    (tmp_path / ".epochs.csv.k3j2.tmp").write_text("epoch,mi")   # a kill mid-write leaves this
    (tmp_path / "notes.tmp").write_text("the user's")             # not one of ours: kept
    (tmp_path / "last.pt").write_text("kept")
    assert remove_temporaries(tmp_path) == [".epochs.csv.k3j2.tmp"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt", "notes.tmp"]
