"""The Lightning and Hugging Face callbacks inside real ``Trainer.fit`` / ``Trainer.train`` runs.

CPU only, tiny models built in the test (no downloads). Skipped, with the reason shown, only
where the framework is not installed (``pip install kappa-gpu[lightning]`` / ``[hf]``).
"""

from __future__ import annotations

import csv
import json
import math
import os

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from _cases import one_thread

ESTIMATE_KW = dict(k=2, tol=1e-3)


@pytest.fixture(autouse=True)
def _one_thread():
    with one_thread():  # tiny models: extra intra-op threads only add synchronization
        yield


def _assert_records(records, n_min):
    assert len(records) >= n_min
    for r in records:
        assert r.status in ("ok", "unconverged"), r.error
        assert r.n_hvp > 0 and r.rho > 0 and r.kappa_V >= 1


# --------------------------------------------------------------------------- Lightning


def test_lightning_callback_in_trainer_fit(tmp_path):
    L = pytest.importorskip("lightning", reason="pip install kappa-gpu[lightning]")
    from kappa_gpu.integrations.lightning import KappaCallback

    class Module(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, batch_idx):
            x, y = batch
            loss = F.cross_entropy(self(x), y)
            self.log("train_loss", loss)
            return loss

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)

    g = torch.Generator().manual_seed(0)
    data = torch.utils.data.TensorDataset(
        torch.randn(64, 6, generator=g), torch.randint(0, 3, (64,), generator=g)
    )
    loader = torch.utils.data.DataLoader(data, batch_size=16)
    cb = KappaCallback(F.cross_entropy, every=3, log_dir=tmp_path / "kappa", **ESTIMATE_KW)
    csv_logger = L.pytorch.loggers.CSVLogger(tmp_path / "logs", name="run")
    trainer = L.Trainer(
        max_steps=12, accelerator="cpu", devices=1, callbacks=[cb], logger=csv_logger,
        log_every_n_steps=1, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False,
    )  # fmt: skip
    trainer.fit(Module(), loader)
    _assert_records(cb.records, 4)
    assert [r.step for r in cb.records] == [3, 6, 9, 12]
    assert cb.records[1].warm_started
    assert "kappa/kappa_V" in trainer.logged_metrics
    assert float(trainer.logged_metrics["kappa/kappa_V"]) == pytest.approx(cb.records[-1].kappa_V)
    lines = (tmp_path / "kappa" / "kappa_monitor.jsonl").read_text().splitlines()
    assert len(lines) == 4 and json.loads(lines[0])["step"] == 3
    with open(os.path.join(csv_logger.log_dir, "metrics.csv")) as f:
        rows = [r for r in csv.DictReader(f) if r.get("kappa/kappa_V")]
    # Through the Lightning logger: every estimate's value reached metrics.csv.
    assert {round(float(r["kappa/kappa_V"]), 4) for r in rows} == {
        round(r.kappa_V, 4) for r in cb.records
    }


@pytest.mark.parametrize("algorithm", ["norm", "value"])
def test_lightning_gradient_clipping_is_in_the_analysed_step(tmp_path, algorithm):
    """Trainer(gradient_clip_val=...) reaches the estimate as the matching clip option; with a
    threshold the gradients exceed, every estimate reports the clip active (arnoldi path). An
    option passed to the callback wins, None included."""
    L = pytest.importorskip("lightning", reason="pip install kappa-gpu[lightning]")
    from kappa_gpu.integrations.lightning import KappaCallback

    class Module(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, batch_idx):
            return F.cross_entropy(self(batch[0]), batch[1])

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)

    g = torch.Generator().manual_seed(0)
    data = torch.utils.data.TensorDataset(
        torch.randn(32, 6, generator=g), torch.randint(0, 3, (32,), generator=g)
    )
    key = f"clip_grad_{algorithm}"
    runs = {}
    for name, extra in (("trainer", {}), ("override", {key: None})):
        cb = KappaCallback(F.cross_entropy, every=2, log=False, **ESTIMATE_KW, **extra)
        trainer = L.Trainer(
            max_steps=4, accelerator="cpu", devices=1, callbacks=[cb], logger=False,
            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
            gradient_clip_val=1e-3, gradient_clip_algorithm=algorithm,
        )  # fmt: skip
        torch.manual_seed(0)
        trainer.fit(Module(), torch.utils.data.DataLoader(data, batch_size=16))
        _assert_records(cb.records, 2)
        runs[name] = cb
    assert runs["trainer"].monitor.estimate_kwargs[key] == 1e-3
    assert all(f"gradient clipping by {algorithm}" in r.message and "active here" in r.message
               and r.method == "arnoldi" for r in runs["trainer"].records)
    assert runs["override"].monitor.estimate_kwargs[key] is None
    assert not any("clipping" in r.message for r in runs["override"].records)


def test_lightning_callback_checks_its_arguments_before_training():
    """A misspelt monitor option fails at construction, not inside fit; an optimizer index the
    trainer does not have is named at train start, not an IndexError."""
    L = pytest.importorskip("lightning", reason="pip install kappa-gpu[lightning]")
    from kappa_gpu.integrations.lightning import KappaCallback

    with pytest.raises(TypeError, match="unknown KappaMonitor option.*evry"):
        KappaCallback(F.cross_entropy, evry=3)
    with pytest.raises(ValueError, match="KappaCallback: clip_grad_norm must be a positive"):
        KappaCallback(F.cross_entropy, clip_grad_norm=-1.0)
    with pytest.raises(ValueError, match="optimizer_index"):
        KappaCallback(F.cross_entropy, optimizer_index=-1)

    class Module(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = nn.Linear(4, 2)

        def training_step(self, batch, batch_idx):
            return F.cross_entropy(self.net(batch[0]), batch[1])

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)

    data = torch.utils.data.TensorDataset(torch.randn(8, 4), torch.randint(0, 2, (8,)))
    cb = KappaCallback(F.cross_entropy, optimizer_index=1, log=False, **ESTIMATE_KW)
    trainer = L.Trainer(
        max_steps=1, accelerator="cpu", devices=1, callbacks=[cb], logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    with pytest.raises(ValueError, match=r"optimizer_index=1\): the trainer has 1 optimizer"):
        trainer.fit(Module(), torch.utils.data.DataLoader(data, batch_size=4))


def test_lightning_gradient_accumulation_counts_optimizer_steps():
    L = pytest.importorskip("lightning", reason="pip install kappa-gpu[lightning]")
    from kappa_gpu.integrations.lightning import KappaCallback

    class Module(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = nn.Linear(4, 2)

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, batch_idx):
            return F.cross_entropy(self(batch[0]), batch[1])

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=1e-2)

    data = torch.utils.data.TensorDataset(torch.randn(32, 4), torch.randint(0, 2, (32,)))
    cb = KappaCallback(F.cross_entropy, every=2, log=False, **ESTIMATE_KW)
    trainer = L.Trainer(
        max_steps=4, accumulate_grad_batches=2, accelerator="cpu", devices=1, callbacks=[cb],
        logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False,
    )  # fmt: skip
    trainer.fit(Module(), torch.utils.data.DataLoader(data, batch_size=4))
    assert [r.step for r in cb.records] == [2, 4]
    assert cb.monitor.n_steps == 4
    _assert_records(cb.records, 2)


# --------------------------------------------------------------------------- Hugging Face


def _tiny_gpt2():
    transformers = pytest.importorskip("transformers", reason="pip install kappa-gpu[hf]")
    pytest.importorskip("accelerate", reason="pip install kappa-gpu[hf]")
    cfg = transformers.GPT2Config(
        vocab_size=32, n_positions=16, n_embd=16, n_layer=1, n_head=2,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )  # fmt: skip
    torch.manual_seed(0)
    return transformers, transformers.GPT2LMHeadModel(cfg)


class _TokenDataset(torch.utils.data.Dataset):
    def __init__(self, n=32, length=8, vocab=32):
        g = torch.Generator().manual_seed(1)
        self.ids = torch.randint(0, vocab, (n, length), generator=g)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


@pytest.mark.parametrize("own_loss", [True, False], ids=["model-loss", "loss_fn"])
def test_hf_callback_in_trainer_train(tmp_path, own_loss, caplog):
    transformers, model = _tiny_gpt2()
    from kappa_gpu.integrations.hf import KappaTrainerCallback

    ds = _TokenDataset()
    probe = {"input_ids": ds.ids[:8], "labels": ds.ids[:8]}

    def lm_loss(logits, labels):  # the causal-LM loss the model computes itself
        return F.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1)
        )

    cb = KappaTrainerCallback(
        probe,
        loss_fn=None if own_loss else lm_loss,
        every=2,
        log_dir=tmp_path / "kappa",
        **ESTIMATE_KW,
    )
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "out"), max_steps=6, per_device_train_batch_size=8,
        learning_rate=1e-3, lr_scheduler_type="constant", use_cpu=True,
        # plain SGD has no exceptional point: its nearest_ep_ratio is NaN
        optim="adamw_torch" if own_loss else "sgd",
        report_to=[], save_strategy="no", logging_steps=100, disable_tqdm=True, seed=0,
    )  # fmt: skip
    trainer = transformers.Trainer(model=model, args=args, train_dataset=ds, callbacks=[cb])
    with caplog.at_level("INFO", logger="kappa_gpu"):
        trainer.train()
    _assert_records(cb.records, 3)
    assert [r.step for r in cb.records] == [2, 4, 6]
    # unwrapped from accelerate
    assert type(cb.monitor.optimizer) is (torch.optim.AdamW if own_loss else torch.optim.SGD)
    # The Trainer clips by default (max_grad_norm=1.0): J is the clipped step's (said once).
    assert caplog.text.count("max_grad_norm=1: the trainer clips gradients by norm") == 1
    assert cb.monitor.estimate_kwargs["clip_grad_norm"] == 1.0
    assert all("gradient clipping by norm (max_norm=1)" in r.message for r in cb.records)
    # trainer_state.json stays strict JSON: only finite values enter log_history.
    json.dumps(trainer.state.log_history, allow_nan=False)
    if not own_loss:
        assert all(math.isnan(r.nearest_ep_ratio) for r in cb.records)
        assert not any("kappa/nearest_ep_ratio" in h for h in trainer.state.log_history)
    with torch.no_grad():
        expected = model(**probe).loss.item()
    assert cb.records[-1].loss == pytest.approx(expected, rel=1e-5)
    logged = [h for h in trainer.state.log_history if "kappa/kappa_V" in h]
    assert [h["step"] for h in logged] == [2, 4, 6]
    assert os.path.exists(tmp_path / "kappa" / "kappa_monitor.jsonl")


def test_hf_callback_needs_a_batch_source():
    pytest.importorskip("transformers", reason="pip install kappa-gpu[hf]")
    from kappa_gpu.integrations.hf import KappaTrainerCallback

    with pytest.raises(ValueError, match="probe_batch"):
        KappaTrainerCallback()
    with pytest.raises(TypeError, match="unknown KappaMonitor option.*evry"):
        KappaTrainerCallback({"input_ids": torch.zeros(1, 2)}, evry=3)
    with pytest.raises(ValueError, match="KappaTrainerCallback: clip_grad_value must be"):
        KappaTrainerCallback({"input_ids": torch.zeros(1, 2)}, clip_grad_value=0)


def test_hf_unwrap_optimizer():
    pytest.importorskip("accelerate", reason="pip install kappa-gpu[hf]")
    from accelerate.optimizer import AcceleratedOptimizer

    from kappa_gpu.integrations.hf import unwrap_optimizer

    opt = torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.1)
    assert unwrap_optimizer(AcceleratedOptimizer(opt, device_placement=False)) is opt
    assert unwrap_optimizer(opt) is opt


def test_missing_framework_raises_importerror_naming_the_extra(monkeypatch):
    import importlib
    import sys

    for mod, extra in (("lightning", "kappa-gpu[lightning]"), ("hf", "kappa-gpu[hf]")):
        blocked = {"lightning": ("lightning", "lightning.pytorch"), "hf": ("transformers",)}[mod]
        for name in blocked:
            monkeypatch.setitem(sys.modules, name, None)
        monkeypatch.delitem(sys.modules, f"kappa_gpu.integrations.{mod}", raising=False)
        with pytest.raises(ImportError, match=extra.replace("[", r"\[").replace("]", r"\]")):
            importlib.import_module(f"kappa_gpu.integrations.{mod}")
        monkeypatch.undo()
        sys.modules.pop(f"kappa_gpu.integrations.{mod}", None)


def test_import_kappa_gpu_does_not_import_frameworks():
    import subprocess
    import sys

    code = (
        "import sys, kappa_gpu, kappa_gpu._monitor, kappa_gpu.integrations; "
        "print(any(m in sys.modules for m in ('lightning', 'transformers')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
