"""Tiny random chat models built from configs, saved as real HF folders (milliseconds to load)."""

from __future__ import annotations

from pathlib import Path

import torch

CHATML = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_CORPUS = [
    "You are a helpful assistant.", "I'm sorry, but I can't help with that.", "Sure, here is how.",
    "Write a poem about the sea", "Explain how plants grow", "Tell me a joke about cats",
    "the quick brown fox jumps over the lazy dog", "As an AI assistant I cannot do that",
    "Give me three tips for better sleep", "How do I bake bread at home?", "0123456789 .,!?'\"-:;()",
]


def tiny_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|im_start|>", "<|im_end|>", "<|endoftext|>"]
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_CORPUS * 4, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   additional_special_tokens=["<|im_start|>"])
    fast.chat_template = CHATML
    return fast


def tiny_model_folder(path: Path, arch: str = "llama", layers: int = 4, hidden: int = 32, seed: int = 0,
                      scale_experts: bool = False, **extra) -> Path:
    """Save a tiny random `arch` model and the tiny tokenizer to `path`."""
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    tokenizer = tiny_tokenizer()
    kwargs = dict(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=2, vocab_size=len(tokenizer),
                  max_position_embeddings=512, eos_token_id=tokenizer.eos_token_id,
                  pad_token_id=tokenizer.pad_token_id, bos_token_id=None, tie_word_embeddings=False)
    kwargs.update(extra)
    config = AutoConfig.for_model(arch, **kwargs)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    # Random init is tiny; scale weights up so different edits give visibly different outputs.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2 or (scale_experts and p.dim() == 3):
                p.mul_(5.0)
    model.generation_config = GenerationConfig(eos_token_id=tokenizer.eos_token_id,
                                               pad_token_id=tokenizer.pad_token_id)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


# Config keys for tiny MoE models of each family (transformers 5 stores their routed experts fused).
MOE_ARCHS: dict[str, dict] = {
    "qwen2_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
                      shared_expert_intermediate_size=16),
    "qwen3_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, head_dim=8),
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2, intermediate_size=24),
    "olmoe": dict(num_experts=4, num_experts_per_tok=2, intermediate_size=24),
    "deepseek_v3": dict(n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, n_shared_experts=1,
                        first_k_dense_replace=1, n_group=1, topk_group=1, kv_lora_rank=16, q_lora_rank=16,
                        qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8, num_key_value_heads=4),
    "gpt_oss": dict(num_local_experts=4, num_experts_per_tok=2, intermediate_size=24, head_dim=8, layer_types=None),
}


def moe_model_folder(path: Path, arch: str, layers: int = 2, hidden: int = 32, seed: int = 0, **extra) -> Path:
    """A tiny random MoE model of family `arch` (fused experts scaled up like the 2-D weights)."""
    return tiny_model_folder(path, arch, layers=layers, hidden=hidden, seed=seed, scale_experts=True,
                             **(MOE_ARCHS[arch] | extra))
