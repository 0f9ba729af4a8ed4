"""LoRA-XS through PEFT under transformers' Trainer on all-MiniLM-L6-v2: checkpoints hold the adapter
only, resume_from_checkpoint continues exactly, gradient checkpointing gives the same gradients."""

from __future__ import annotations

import os

import pytest
import torch

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
import loraxs_kernels.peft as lp  # noqa: E402
from hf_models import minilm, token_ids  # noqa: E402
from loraxs_kernels import FusedLoRAXSLinear  # noqa: E402

N, LENGTH, STEPS = 16, 8, 4


class _Data(torch.utils.data.Dataset):
    def __init__(self):
        self.ids = token_ids(batch=N, length=LENGTH, seed=3)
        self.labels = torch.randint(0, 2, (N,), generator=torch.Generator().manual_seed(4))

    def __len__(self):
        return N

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.labels[i]}


def _peft_model():
    base = minilm(head_seed=1)
    torch.manual_seed(0)  # after minilm(): its first call in a process draws from the global RNG
    return peft.get_peft_model(base, lp.LoraXSConfig(r=4, target_modules=["query", "value"],
                                                                   task_type="SEQ_CLS"))


def _trainer(model, out, max_steps):
    args = transformers.TrainingArguments(
        output_dir=str(out), max_steps=max_steps, per_device_train_batch_size=4, learning_rate=1e-2,
        save_strategy="steps", save_steps=2, logging_strategy="no", report_to=[], use_cpu=True, seed=0,
        dataloader_num_workers=0, disable_tqdm=True)
    return transformers.Trainer(model=model, args=args, train_dataset=_Data())


def _adapter_state(model):
    return {k: v.detach().clone() for k, v in peft.get_peft_model_state_dict(model).items()}


def test_checkpoints_hold_the_adapter_only_and_resume_continues_exactly(tmp_path):
    straight = _peft_model()
    _trainer(straight, tmp_path / "a", STEPS).train()
    want = _adapter_state(straight)

    ckpt = tmp_path / "a" / "checkpoint-2"
    files = set(os.listdir(ckpt))
    assert {"adapter_model.safetensors", "adapter_config.json"} <= files, files
    assert not files & {"model.safetensors", "pytorch_model.bin"}, files  # no full-model weights
    assert (ckpt / "adapter_model.safetensors").stat().st_size < 100_000  # R's (12 × 16) + the classifier

    resumed = _peft_model()
    _trainer(resumed, tmp_path / "b", STEPS).train(resume_from_checkpoint=str(ckpt))
    got = _adapter_state(resumed)
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in want), [k for k in want if not torch.equal(got[k], want[k])][:3]
    first = _peft_model()  # the resumed run did move away from the checkpoint's state
    assert not all(torch.equal(v, want[k]) for k, v in _adapter_state(first).items())


def _checkpointing_grads(checkpointing: bool):
    """The trainable parameters' gradients of one training step (dropout off, so both runs compute the same)."""
    model = _peft_model()
    model.enable_input_require_grads()  # what PEFT/Trainer do so that reentrant checkpointing sees a grad path
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    model.train()
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    calls = []
    for m in model.modules():
        if isinstance(m, FusedLoRAXSLinear):
            m.register_forward_hook(lambda *a: calls.append(1))
    model(input_ids=token_ids(batch=4, length=LENGTH), labels=torch.tensor([0, 1, 1, 0])).loss.backward()
    assert len(calls) == (24 if checkpointing else 12)  # checkpointing re-ran the 12 adapted layers
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_gradient_checkpointing_gives_the_same_R_gradients():
    plain, checkpointed = _checkpointing_grads(False), _checkpointing_grads(True)
    assert plain.keys() == checkpointed.keys() and sum("lora_R" in n for n in plain) == 12
    assert all(g.abs().max() > 0 for g in plain.values())
    # The recomputation runs the same ops on the same inputs: bitwise the same gradients.
    assert all(torch.equal(checkpointed[n], plain[n]) for n in plain)
