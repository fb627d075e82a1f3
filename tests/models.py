"""The model zoo every pass is tested on.

Each factory builds a tiny model from a config with random weights (no downloads), in eval mode and
deterministic (a fixed seed inside the factory), and returns a :class:`ZooModel`: the model, a sample batch
(``example_inputs``, batch 2) and a second batch with a different batch size and, where the model has a
sequence axis, a different sequence length (``other_inputs``, batch 3).

How to capture a zoo model (the zoo, not the test, knows which axes are dynamic)::

    zm = ZOO["bert"]()
    args, kwargs = zm.split(zm.example_inputs)
    ep = torch.export.export(zm.model, args, kwargs, strict=False, dynamic_shapes=zm.dynamic_shapes())

``dims`` names the dynamic axes of every input, by keyword (dict inputs) or by position (tuple inputs):
``{"input_ids": {0: "batch", 1: "seq"}}``. Axes with the same name share one ``torch.export.Dim``.
``dim_max`` bounds a Dim where the model needs it (e.g. learned position embeddings).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ZOO", "ZooModel", "all_names", "get"]

SEED = 0
BATCH = 2  # example batch (>= 2, or torch.export specialises the batch axis)
OTHER_BATCH = 3
SEQ = 8  # example sequence length
OTHER_SEQ = 11
MAX_POS = 32  # learned position-embedding table length of the text models
VOCAB = 100
EOS = VOCAB - 1

Inputs = tuple[torch.Tensor, ...] | dict[str, torch.Tensor]


@dataclass
class ZooModel:
    name: str
    model: nn.Module
    example_inputs: Inputs
    other_inputs: Inputs
    expected_groups: list[Any] = field(default_factory=list)  # golden listing, filled in later
    dims: dict[str | int, dict[int, str]] = field(default_factory=dict)
    dim_max: dict[str, int] = field(default_factory=dict)
    notes: str = ""

    @staticmethod
    def split(inputs: Inputs) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """``(args, kwargs)`` for ``model(*args, **kwargs)`` / ``torch.export.export``."""
        if isinstance(inputs, dict):
            return (), dict(inputs)
        return tuple(inputs), {}

    def call(self, inputs: Inputs) -> Any:
        args, kwargs = self.split(inputs)
        return self.model(*args, **kwargs)

    def make_dims(self) -> dict[str, torch.export.Dim]:
        """One shared ``torch.export.Dim`` per axis name used in ``dims``."""
        names = sorted({n for axes in self.dims.values() for n in axes.values()})
        return {n: torch.export.Dim(n, max=self.dim_max[n]) if n in self.dim_max else torch.export.Dim(n)
                for n in names}

    def dynamic_shapes(self) -> tuple[Any, ...] | dict[str, Any]:
        """The ``dynamic_shapes`` argument matching ``split(example_inputs)``."""
        d = self.make_dims()

        def spec(key: str | int) -> dict[int, Any] | None:
            axes = self.dims.get(key)
            return {ax: d[n] for ax, n in axes.items()} if axes else None

        if isinstance(self.example_inputs, dict):
            return {k: spec(k) for k in self.example_inputs}
        return tuple(spec(i) for i in range(len(self.example_inputs)))


# ---------------------------------------------------------------------------------------------- inputs

def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _tokens(batch: int, seq: int, seed: int, eos: int | None = None) -> dict[str, torch.Tensor]:
    """input_ids + attention_mask; the last row is right-padded (3 pad tokens, id 0).

    Ordinary tokens are drawn from [3, VOCAB - 2): 0 = pad, 1 = bos, 2 = sep, VOCAB - 1 = eos (placed at the
    last real token of every row when ``eos`` is given).
    """
    ids = torch.randint(3, VOCAB - 2, (batch, seq), generator=_gen(seed))
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[-1, seq - 3:] = 0
    ids[-1, seq - 3:] = 0
    if eos is not None:
        ids[:-1, -1] = eos
        ids[-1, seq - 4] = eos
    return {"input_ids": ids, "attention_mask": mask}


def _pixels(batch: int, seed: int, size: int = 32) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=_gen(seed))


def _text_dims() -> dict[str | int, dict[int, str]]:
    return {"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "seq"}}


def _pixel_dims() -> dict[str | int, dict[int, str]]:
    return {"pixel_values": {0: "batch"}}


def _eval(model: nn.Module) -> nn.Module:
    return model.eval()


def _text_zoo(name: str, model: nn.Module, **extra: Any) -> ZooModel:
    """A text model of the zoo: ``model`` in eval mode with the standard token batches (:func:`_tokens`) and
    their dynamic batch and sequence axes; ``extra``: the other :class:`ZooModel` fields (notes, ``dim_max``)."""
    return ZooModel(name, _eval(model), _tokens(BATCH, SEQ, 1), _tokens(OTHER_BATCH, OTHER_SEQ, 2),
                    dims=_text_dims(), **extra)


SDPA = dict(attn_implementation="sdpa")  # the transformers 5.x default, pinned so the graphs stay put


# ---------------------------------------------------------------------------------------------- models

def bert() -> ZooModel:
    from transformers import BertConfig, BertModel

    torch.manual_seed(SEED)
    cfg = BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=MAX_POS, **SDPA)
    return _text_zoo("bert", BertModel(cfg),
                     dim_max={"seq": MAX_POS},
                     notes="separate q/k/v Linears; SDPA with bool padding mask and scale=1/sqrt(8)")


def bert_cls() -> ZooModel:
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(SEED)
    cfg = BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=MAX_POS, num_labels=3, **SDPA)
    return _text_zoo("bert_cls", BertForSequenceClassification(cfg),
                     dim_max={"seq": MAX_POS}, notes="BertModel + pooler/dropout/classifier")


def vit() -> ZooModel:
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(SEED)
    cfg = ViTConfig(image_size=32, patch_size=8, num_channels=3, hidden_size=32, num_hidden_layers=2,
                    num_attention_heads=4, intermediate_size=64, num_labels=5, **SDPA)
    return ZooModel("vit", _eval(ViTForImageClassification(cfg)),
                    {"pixel_values": _pixels(BATCH, 1)}, {"pixel_values": _pixels(OTHER_BATCH, 2)},
                    dims=_pixel_dims(), notes="17 tokens (cls + 16 patches): token count is a literal in the graph")


def deit() -> ZooModel:
    from transformers import DeiTConfig, DeiTModel

    torch.manual_seed(SEED)
    cfg = DeiTConfig(image_size=32, patch_size=8, num_channels=3, hidden_size=32, num_hidden_layers=2,
                     num_attention_heads=4, intermediate_size=64, **SDPA)
    return ZooModel("deit", _eval(DeiTModel(cfg)),
                    {"pixel_values": _pixels(BATCH, 1)}, {"pixel_values": _pixels(OTHER_BATCH, 2)},
                    dims=_pixel_dims(), notes="18 tokens (cls + distillation + 16 patches); pooler output")


def distilbert() -> ZooModel:
    from transformers import DistilBertConfig, DistilBertModel

    torch.manual_seed(SEED)
    cfg = DistilBertConfig(vocab_size=VOCAB, dim=32, n_layers=2, n_heads=4, hidden_dim=64,
                           max_position_embeddings=MAX_POS, **SDPA)
    return _text_zoo("distilbert", DistilBertModel(cfg),
                     dim_max={"seq": MAX_POS}, notes="q_lin/k_lin/v_lin/out_lin; no embedding token types")


def gpt2() -> ZooModel:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(SEED)
    cfg = GPT2Config(vocab_size=VOCAB, n_positions=MAX_POS, n_embd=32, n_layer=2, n_head=4, n_inner=128,
                     bos_token_id=1, eos_token_id=EOS, use_cache=False, **SDPA)
    return _text_zoo("gpt2", GPT2LMHeadModel(cfg),
                     dim_max={"seq": MAX_POS},
                     notes="use_cache=False (with the cache, export fails: DynamicCache output is not a pytree); "
                           "Conv1D = view+addmm with [in, out] weights; packed c_attn split(32); gelu_new chain; "
                           "lm_head tied to wte")


def llama() -> ZooModel:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(SEED)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=MAX_POS,
                      bos_token_id=1, eos_token_id=EOS, pad_token_id=0, use_cache=False, **SDPA)
    return _text_zoo("llama", LlamaForCausalLM(cfg),
                     notes="RoPE (rotate_half: dim j paired with j + d/2; cos/sin computed once, shared by layers), "
                           "GQA 4 query heads over 2 KV heads (repeat_kv: expand + reshape), SwiGLU MLP, RMSNorm; "
                           "use_cache=False so that the eager output compares with the graph's (capture turns the "
                           "cache off by itself: tests/test_capture.py)")


def mixtral() -> ZooModel:
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(SEED)
    cfg = MixtralConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=32, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                        max_position_embeddings=MAX_POS, bos_token_id=1, eos_token_id=EOS, pad_token_id=0,
                        use_cache=False, **SDPA)
    return _text_zoo("mixtral", MixtralForCausalLM(cfg),
                     notes="mixture of experts: a top-2 router over 4 experts stacked in 3-D weights (gate_up_proj "
                           "[E, 2I, H], down_proj [E, H, I]) applied by a grouped matmul over the rows sorted by "
                           "expert; RoPE + GQA attention as in Llama")


def qwen3() -> ZooModel:
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(SEED)
    cfg = Qwen3Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=MAX_POS,
                      bos_token_id=1, eos_token_id=EOS, pad_token_id=0, use_cache=False, **SDPA)
    return _text_zoo("qwen3", Qwen3ForCausalLM(cfg),
                     notes="per-head RMSNorm on q and k (q_norm/k_norm over head_dim, one weight shared by the heads) "
                           "before RoPE; GQA 4 query heads over 2 KV heads; SwiGLU MLP")


def gemma3() -> ZooModel:
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(SEED)
    cfg = Gemma3TextConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=MAX_POS,
                           sliding_window=4, layer_types=["sliding_attention", "full_attention"], bos_token_id=1,
                           eos_token_id=EOS, pad_token_id=0, use_cache=False, **SDPA)
    return _text_zoo("gemma3", Gemma3ForCausalLM(cfg),
                     notes="per-head q/k RMSNorm, one KV head (multi-query), a sliding-window layer then a global one "
                           "(two rotary tables), scaled embeddings, GeGLU MLP, sandwich norms")


def bigcode() -> ZooModel:
    from transformers import GPTBigCodeConfig, GPTBigCodeForCausalLM

    torch.manual_seed(SEED)
    cfg = GPTBigCodeConfig(vocab_size=VOCAB, n_positions=MAX_POS, n_embd=32, n_layer=2, n_head=4, n_inner=64,
                           multi_query=True, bos_token_id=1, eos_token_id=EOS, pad_token_id=0, use_cache=False,
                           **SDPA)
    return _text_zoo("bigcode", GPTBigCodeForCausalLM(cfg),
                     dim_max={"seq": MAX_POS},
                     notes="StarCoder-style multi-query attention: one fused c_attn [q (4 heads) | k | v (one head)], "
                           "learned positions")


def deepseek_v3() -> ZooModel:
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    torch.manual_seed(SEED)
    cfg = DeepseekV3Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=4, q_lora_rank=16, kv_lora_rank=16,
                           qk_rope_head_dim=4, qk_nope_head_dim=8, v_head_dim=8, n_routed_experts=4,
                           num_experts_per_tok=2, n_shared_experts=1, moe_intermediate_size=16, first_k_dense_replace=1,
                           n_group=1, topk_group=1, max_position_embeddings=MAX_POS, bos_token_id=1, eos_token_id=EOS,
                           pad_token_id=0, use_cache=False, **SDPA)
    return _text_zoo("deepseek_v3", DeepseekV3ForCausalLM(cfg),
                     notes="multi-head latent attention (low-rank q and kv projections with RMSNorms, a RoPE key shared "
                           "by the heads, the key assembled with new_empty + copy_); a dense first layer, then a "
                           "mixture of 4 routed experts (top-2 of sigmoid scores with a bias) and a shared expert")


def gptj() -> ZooModel:
    from transformers import GPTJConfig, GPTJForCausalLM

    torch.manual_seed(SEED)
    cfg = GPTJConfig(vocab_size=VOCAB, n_positions=MAX_POS, n_embd=32, n_layer=2, n_head=4, rotary_dim=4,
                     bos_token_id=1, eos_token_id=EOS, use_cache=False, **SDPA)
    return _text_zoo("gptj", GPTJForCausalLM(cfg),
                     notes="interleaved RoPE (2i paired with 2i+1: strided slices, stack, flatten) on the first "
                           "rotary_dim=4 of 8 head dims (partial rotary); parallel attention + MLP")


def bloom() -> ZooModel:
    from transformers import BloomConfig, BloomForCausalLM

    torch.manual_seed(SEED)
    cfg = BloomConfig(vocab_size=VOCAB, hidden_size=32, n_layer=2, n_head=4, bos_token_id=1, eos_token_id=EOS,
                      use_cache=False)
    return _text_zoo("bloom", BloomForCausalLM(cfg),
                     notes="ALiBi: scores = baddbmm(alibi, q, kᵀ) on (B·H, T, d) tensors, the per-head bias passing "
                           "through (it fixes the heads: granularity='heads' prunes head dims there); per-head "
                           "fused query_key_value viewed as (B, T, H, 3, d)")


def mpnet() -> ZooModel:
    from transformers import MPNetConfig, MPNetModel

    torch.manual_seed(SEED)
    cfg = MPNetConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                      intermediate_size=64, max_position_embeddings=MAX_POS + 2, pad_token_id=0)
    return _text_zoo("mpnet", MPNetModel(cfg),
                     dim_max={"seq": MAX_POS},
                     notes="a relative-position bias embedding (one column per head) added to the eager attention "
                           "scores: not channels, and it fixes the heads")


def deberta_v2() -> ZooModel:
    from transformers import DebertaV2Config, DebertaV2Model

    torch.manual_seed(SEED)
    cfg = DebertaV2Config(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                          intermediate_size=64, max_position_embeddings=MAX_POS, relative_attention=True,
                          pos_att_type=["p2c", "c2p"], position_buckets=16, pad_token_id=0)
    return _text_zoo("deberta_v2", DebertaV2Model(cfg),
                     notes="disentangled attention on (B·H, T, d): c2p/p2c terms multiply q and k with projections "
                           "of the relative embeddings repeated per batch (aten.repeat: an outer factor); those "
                           "per-head score terms fix the heads")


def torch_transformer() -> ZooModel:
    torch.manual_seed(SEED)
    model = _eval(nn.Transformer(d_model=32, nhead=4, num_encoder_layers=1, num_decoder_layers=1,
                                 dim_feedforward=64, batch_first=True))
    src, tgt = torch.randn(BATCH, SEQ, 32, generator=_gen(1)), torch.randn(BATCH, SEQ - 3, 32, generator=_gen(2))
    src2, tgt2 = (torch.randn(OTHER_BATCH, OTHER_SEQ, 32, generator=_gen(3)),
                  torch.randn(OTHER_BATCH, OTHER_SEQ - 4, 32, generator=_gen(4)))
    return ZooModel("torch_transformer", model, (src, tgt), (src2, tgt2),
                    dims={0: {0: "batch", 1: "seq"}, 1: {0: "batch", 1: "tgt_seq"}},
                    notes="encoder-decoder; the decoder's cross-attention has query != key/value: "
                          "_in_projection_packed splits in_proj_weight (parameter views)")


def segformer() -> ZooModel:
    from transformers import SegformerConfig, SegformerForSemanticSegmentation

    torch.manual_seed(SEED)
    cfg = SegformerConfig(num_encoder_blocks=2, depths=[1, 1], sr_ratios=[2, 1], hidden_sizes=[16, 32],
                          patch_sizes=[7, 3], strides=[4, 2], num_attention_heads=[1, 2], mlp_ratios=[2, 2],
                          decoder_hidden_size=32, num_labels=3, image_size=32)
    return ZooModel("segformer", _eval(SegformerForSemanticSegmentation(cfg)), {"pixel_values": _pixels(BATCH, 1)},
                    {"pixel_values": _pixels(OTHER_BATCH, 2)}, dims=_pixel_dims(),
                    notes="Mix-FFN: depthwise 3x3 conv between FC1 and FC2; spatial-reduction attention "
                          "(k/v from a strided conv of the tokens); all-MLP decoder with bilinear upsampling")


def llava() -> ZooModel:
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    torch.manual_seed(SEED)
    image_token, image_seq = VOCAB + 10, 16  # (32 / 8)² patches, CLS dropped ("default" strategy)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                              image_size=32, patch_size=8, projection_dim=32)
    text = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=VOCAB + 20, use_cache=False, pad_token_id=0)
    cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_index=image_token,
                      projector_hidden_act="gelu", vision_feature_layer=-1, vision_feature_select_strategy="default",
                      image_seq_length=image_seq, **SDPA)

    def inputs(batch: int, text_len: int, seed: int) -> dict[str, torch.Tensor]:
        ids = torch.randint(3, VOCAB - 2, (batch, image_seq + text_len), generator=_gen(seed))
        ids[:, 1:1 + image_seq] = image_token
        return {"input_ids": ids, "pixel_values": _pixels(batch, seed), "attention_mask": torch.ones_like(ids)}

    return ZooModel("llava", _eval(LlavaForConditionalGeneration(cfg)), inputs(BATCH, 4, 1), inputs(BATCH, 7, 2),
                    dims={"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "seq"}},
                    notes="LLaVA-style VLM: CLIP vision tower + 2-layer GELU projector + Llama (RoPE + GQA); image "
                          "features scattered into the token embeddings (masked_scatter). torch.export fixes the "
                          "number of images, so other_inputs keeps batch 2 and changes the text length")


def clip() -> ZooModel:
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(SEED)
    text = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, max_position_embeddings=MAX_POS, projection_dim=16,
                pad_token_id=0, bos_token_id=1, eos_token_id=EOS)
    vision = dict(image_size=32, patch_size=8, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, projection_dim=16)
    cfg = CLIPConfig(text_config=text, vision_config=vision, projection_dim=16, **SDPA)
    model = _eval(CLIPModel(cfg))

    def inputs(batch: int, seq: int, seed: int) -> dict[str, torch.Tensor]:
        tok = _tokens(batch, seq, seed, eos=EOS)
        return {**tok, "pixel_values": _pixels(batch, seed)}

    return ZooModel("clip", model, inputs(BATCH, SEQ, 1), inputs(OTHER_BATCH, OTHER_SEQ, 2),
                    dims={**_text_dims(), **_pixel_dims()}, dim_max={"seq": MAX_POS},
                    notes="text 32 wide / vision 48 wide, both projected to 16; quick_gelu = mul+sigmoid; "
                          "text pooled at the eos token (argmax of input_ids == eos)")


def blip_vqa() -> ZooModel:
    from transformers import BlipConfig, BlipForQuestionAnswering

    from benchmarks.vqa_digits import BlipVQA

    torch.manual_seed(SEED)
    # The answer decoder cross-attends to the question encoder's output with the same text_config, so
    # BLIP VQA needs text hidden == encoder_hidden_size == vision hidden. Heads differ (head dims 16 / 8).
    text = dict(vocab_size=VOCAB, hidden_size=32, encoder_hidden_size=32, intermediate_size=64,
                num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=MAX_POS,
                pad_token_id=0, bos_token_id=1, sep_token_id=2, use_cache=False)
    vision = dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4)
    cfg = BlipConfig(text_config=text, vision_config=vision)
    model = _eval(BlipVQA(BlipForQuestionAnswering(cfg)))

    def inputs(batch: int, seq: int, ans: int, seed: int) -> dict[str, torch.Tensor]:
        tok = _tokens(batch, seq, seed)
        dec = torch.randint(3, VOCAB - 2, (batch, ans), generator=_gen(seed + 100))
        dec[:, 0] = 1  # bos
        return {**tok, "pixel_values": _pixels(batch, seed), "decoder_input_ids": dec}

    return ZooModel("blip_vqa", model, inputs(BATCH, SEQ, 5, 1), inputs(OTHER_BATCH, OTHER_SEQ, 7, 2),
                    dims={**_text_dims(), **_pixel_dims(), "decoder_input_ids": {0: "batch", 1: "answer_seq"}},
                    dim_max={"seq": MAX_POS, "answer_seq": MAX_POS},
                    notes="wrapper BlipVQA of benchmarks.vqa_digits (the HF forward returns no decoder output); vision packed qkv; "
                          "text encoder self+cross (to image), answer decoder causal self+cross (to question)")


def blip_caption() -> ZooModel:
    from transformers import BlipConfig, BlipForConditionalGeneration

    torch.manual_seed(SEED)
    # the captioner's text decoder cross-attends to the image tokens: text encoder_hidden_size == vision hidden
    text = dict(vocab_size=VOCAB, hidden_size=32, encoder_hidden_size=32, intermediate_size=64,
                num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=MAX_POS,
                pad_token_id=0, bos_token_id=1, sep_token_id=2, eos_token_id=EOS, use_cache=False)
    vision = dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4)
    model = _eval(BlipForConditionalGeneration(BlipConfig(text_config=text, vision_config=vision)))

    def inputs(batch: int, seq: int, seed: int) -> dict[str, torch.Tensor]:
        tok = _tokens(batch, seq, seed)
        tok["input_ids"][:, 0] = 1  # bos
        return {**tok, "pixel_values": _pixels(batch, seed)}

    return ZooModel("blip_caption", model, inputs(BATCH, SEQ, 1), inputs(OTHER_BATCH, OTHER_SEQ, 2),
                    dims={**_text_dims(), **_pixel_dims()}, dim_max={"seq": MAX_POS},
                    notes="image captioner: vision packed qkv; causal text decoder with cross-attention to the "
                          "image tokens; generate() runs in its own class")


def torch_encoder() -> ZooModel:
    torch.manual_seed(SEED)
    layer = nn.TransformerEncoderLayer(d_model=32, nhead=4, dim_feedforward=64, batch_first=True)
    model = _eval(nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False))
    x = torch.randn(BATCH, SEQ, 32, generator=_gen(1))
    y = torch.randn(OTHER_BATCH, OTHER_SEQ, 32, generator=_gen(2))
    return ZooModel("torch_encoder", model, (x,), (y,), dims={0: {0: "batch", 1: "seq"}},
                    notes="nn.MultiheadAttention: packed in_proj (unflatten/select), SDPA with scale=None; "
                          "export records the regular (non fast-path) aten ops")


# ------------------------------------------------------------------------------- timm-style ViT

class PatchEmbed(nn.Module):
    def __init__(self, img: int = 32, patch: int = 8, in_chans: int = 3, dim: int = 32) -> None:
        super().__init__()
        self.num_patches = (img // patch) ** 2
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=patch, stride=patch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, C, H', W') -> (B, N, C)


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # (B, H, N, d) each
        x = F.scaled_dot_product_attention(q, k, v)  # (B, H, N, d)
        x = x.transpose(1, 2).reshape(B, N, C)
        return self.proj(x)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TimmViT(nn.Module):
    def __init__(self, img: int = 32, patch: int = 8, dim: int = 32, depth: int = 2, num_heads: int = 4,
                 num_classes: int = 5) -> None:
        super().__init__()
        self.patch_embed = PatchEmbed(img, patch, 3, dim)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.pos_embed = nn.Parameter(torch.randn(1, self.patch_embed.num_patches + 1, dim) * 0.02)
        self.blocks = nn.Sequential(*[Block(dim, num_heads) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)  # (B, N, C)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)  # (B, 1+N, C)
        x = x + self.pos_embed
        x = self.norm(self.blocks(x))
        return self.head(x[:, 0])  # (B, num_classes)


def timm_vit() -> ZooModel:
    torch.manual_seed(SEED)
    model = _eval(TimmViT())
    return ZooModel("timm_vit", model, (_pixels(BATCH, 1),), (_pixels(OTHER_BATCH, 2),), dims={0: {0: "batch"}},
                    notes="packed qkv reshape(B, N, 3, H, d).permute(2, 0, 3, 1, 4).unbind(0); SDPA scale=None")


# ---------------------------------------------------------------------------------------------- registry

ZOO: dict[str, Callable[[], ZooModel]] = {
    "bert": bert,
    "bert_cls": bert_cls,
    "vit": vit,
    "deit": deit,
    "distilbert": distilbert,
    "gpt2": gpt2,
    "llama": llama,
    "mixtral": mixtral,
    "gptj": gptj,
    "qwen3": qwen3,
    "gemma3": gemma3,
    "bigcode": bigcode,
    "deepseek_v3": deepseek_v3,
    "bloom": bloom,
    "mpnet": mpnet,
    "deberta_v2": deberta_v2,
    "clip": clip,
    "blip_vqa": blip_vqa,
    "blip_caption": blip_caption,
    "torch_encoder": torch_encoder,
    "timm_vit": timm_vit,
    "torch_transformer": torch_transformer,
    "llava": llava,
    "segformer": segformer,
}


def all_names() -> list[str]:
    return list(ZOO)


def get(name: str) -> ZooModel:
    return ZOO[name]()


@functools.cache
def half(name: str) -> tuple[ZooModel, Any]:
    """Zoo model ``name`` and its ``upop_fx.compress`` at ratio 0.5 by magnitude, without a retrain — once per test
    process: ``test_compress_zoo`` checks the cut, ``test_groups`` the analysis of the graph it captured
    (``result.dense``). Neither changes them (conftest runs both modules in one xdist worker)."""
    import upop_fx

    zoo = get(name)
    return zoo, upop_fx.compress(zoo.model, zoo.example_inputs, ratio=0.5, method="magnitude", retrain_steps=0)
