"""The chunked next-token loss equals the model's own loss (transformers' ForCausalLMLoss) and its gradients, without
ever building logits for more than one chunk of positions."""

from __future__ import annotations

import pytest
import torch

from hf_rope_ext.training import pose
from hf_rope_ext.training.loss import chunked_causal_lm_loss, supports_chunked_loss
from tests.conftest import VOCAB, tiny_model


def _batch(seed: int = 0, batch: int = 2, length: int = 40, pose_positions: bool = True) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch, length), generator=gen)
    labels = ids.clone()
    labels[0, :5] = -100  # some ignored targets, as with masked prompts
    out = {"input_ids": ids, "labels": labels}
    if pose_positions:  # PoSE: gaps in the position ids and an explicit mask, as the recipe sends them
        position_ids, mask = pose.pose_batch(batch, length, 256, num_chunks=2, generator=gen)
        out.update(position_ids=position_ids, attention_mask=mask)
    return out


def _grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _compare(model: torch.nn.Module, batch: dict[str, torch.Tensor], chunk: int) -> None:
    model.zero_grad(set_to_none=True)
    reference = model(**batch, use_cache=False).loss  # transformers' own loss over full logits
    reference.backward()
    want = _grads(model)
    model.zero_grad(set_to_none=True)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    loss = chunked_causal_lm_loss(model, batch["labels"], chunk=chunk, **inputs)
    loss.backward()
    got = _grads(model)
    torch.testing.assert_close(loss, reference, rtol=1e-5, atol=1e-6)
    assert want.keys() == got.keys() and want
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("chunk", [1, 7, 39, 4096])
def test_equals_model_loss_and_gradients(chunk):
    model = tiny_model("llama").train()
    _compare(model, _batch(), chunk)


@pytest.mark.parametrize("model_type", ["gemma2", "qwen2"])
def test_other_heads(model_type):
    # gemma2: tied embeddings and final-logit soft-capping; qwen2: an untied head
    overrides = {"final_logit_softcapping": 5.0} if model_type == "gemma2" else {}
    model = tiny_model(model_type, **overrides).train()
    _compare(model, _batch(seed=1, pose_positions=False), chunk=8)


def test_through_peft_lora():
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = get_peft_model(tiny_model("llama"), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    for p in model.parameters():  # LoRA B starts at zero: give it values so A's gradient is not trivially zero
        if p.requires_grad:
            p.data.normal_(0, 0.1)
    model.train()
    _compare(model, _batch(seed=2), chunk=5)


def test_head_never_sees_more_than_a_chunk():
    model = tiny_model("llama").train()
    seen: list[int] = []
    handle = model.get_output_embeddings().register_forward_hook(lambda m, a, o: seen.append(a[0].shape[1]))
    batch = _batch(length=64)
    loss = chunked_causal_lm_loss(model, batch.pop("labels"), chunk=16, **batch)
    loss.backward()  # checkpointing re-runs the head per chunk in backward
    handle.remove()
    assert max(seen) <= 16 and len(seen) > 4


def test_refusals():
    model = tiny_model("llama")
    batch = _batch()
    with pytest.raises(ValueError, match="chunk must be >= 1"):
        chunked_causal_lm_loss(model, batch.pop("labels"), chunk=0, **batch)
    assert supports_chunked_loss(model) is None
    model.config.logit_scale = 0.5
    assert "logit_scale" in supports_chunked_loss(model)
