"""Reduced-size instances of LeRobot's real pi0 / pi0.5 / SmolVLA modeling code, built offline.

The real models are 0.5-3.3 B parameters and their tokenizers and VLM configs come from the Hugging
Face hub. CPU tests, the CPU benchmark and the image+language demo need the *same modeling code* at a
size a 2-core machine can train, with nothing downloaded. ``backbone_reduced`` in ``PiRLConfig``
names such a size; everything here builds it deterministically from that spec alone, so a saved
``pi_rl`` checkpoint of a reduced model reloads anywhere (edge, learner, export) without a network:

* pi0 / pi0.5: LeRobot builds the PaliGemma VLM from ``CONFIG_MAPPING["paligemma"]()`` defaults and
  the Gemma widths from ``get_gemma_config(variant)``, with no argument to shrink either. While the
  model is *constructed* we substitute both (``unittest.mock.patch`` on the two module attributes,
  nothing else), then shrink the 257 k-token vocabulary with transformers' own
  ``resize_token_embeddings`` and give the SigLIP projector the reduced text width. Every forward
  pass afterwards is LeRobot's and transformers' unmodified code.
* SmolVLA: LeRobot reads the VLM from ``vlm_model_name`` (``AutoConfig`` / ``AutoProcessor``), which
  may be a local directory; we write a tiny SmolVLM config, tokenizer and processor there.
* a word-level tokenizer with the task vocabulary, the digits pi0.5 uses for its state tokens and
  SmolVLM's image special tokens stands in for the PaliGemma / SmolVLM tokenizers.

Generated directories live under ``$PIRL_CACHE_DIR`` (default ``~/.cache/lerobot_policy_pi_rl``),
named by a hash of their spec, written atomically.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, fields
from pathlib import Path


# Fields of a reduced size, with the defaults the CPU tests and the demo use.
@dataclass(frozen=True)
class ReducedSize:
    """A shrunk VLA: widths, depths and vocabulary small enough for a CPU.

    vlm_width / vlm_depth: the VLM (PaliGemma's Gemma, SmolVLM's text model) hidden size and layers.
    expert_width: the action expert's hidden size (pi0 / pi0.5; SmolVLA derives it from
        ``expert_width_multiplier``).
    num_heads / head_dim: attention heads (pi0's joint attention hard-codes 8) and their width,
        shared by VLM and expert as the real models do; one KV head.
    vision_width / vision_depth / vision_heads / patch_size: the SigLIP (or SmolVLM vision) tower.
    image_size: the side images are resized (with padding) to before the vision tower.
    """

    vlm_width: int = 64
    vlm_depth: int = 2
    expert_width: int = 32
    num_heads: int = 8
    head_dim: int = 8
    vision_width: int = 32
    vision_depth: int = 1
    vision_heads: int = 2
    patch_size: int = 8
    image_size: int = 32

    @classmethod
    def from_dict(cls, spec: dict | None) -> ReducedSize:
        spec = dict(spec or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(spec) - known)
        if unknown:
            raise ValueError(f"policy.backbone_reduced: unknown field(s) {unknown}; known: {sorted(known)}")
        size = cls(**{k: int(v) for k, v in spec.items()})
        for f in fields(size):
            if getattr(size, f.name) < 1:
                raise ValueError(f"policy.backbone_reduced.{f.name}: must be >= 1 (got {getattr(size, f.name)})")
        if size.image_size % size.patch_size:
            raise ValueError(
                f"policy.backbone_reduced: image_size {size.image_size} must be a multiple of patch_size {size.patch_size}"
            )
        return size

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:12]


# --- the stand-in tokenizer ----------------------------------------------------------------------

SPECIAL_TOKENS = [
    "<pad>",
    "<eos>",
    "<bos>",
    "<unk>",
    "<image>",
    "<fake_token_around_image>",
    "<global-img>",
    "<end_of_utterance>",
    "<video>",
]
# words of the built-in task and common manipulation instructions; pi0.5's prompt template words
WORDS = sorted(
    {
        "reach",
        "the",
        "target",
        "and",
        "grasp",
        "it",
        "pick",
        "place",
        "put",
        "push",
        "pull",
        "open",
        "close",
        "move",
        "to",
        "on",
        "in",
        "of",
        "a",
        "an",
        "left",
        "right",
        "up",
        "down",
        "red",
        "green",
        "blue",
        "cube",
        "block",
        "object",
        "gripper",
        "task",
        "state",
        "action",
    }
)
PUNCTUATION = [",", ";", ":", ".", "\n"]


def cache_dir() -> Path:
    return Path(os.environ.get("PIRL_CACHE_DIR", Path.home() / ".cache" / "lerobot_policy_pi_rl"))


def atomic_dir(final: Path, write) -> Path:
    """Create ``final`` by ``write(tmp_dir)`` then one rename; concurrent builders agree."""
    if final.is_dir():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=final.parent))
    try:
        write(tmp)
        try:
            tmp.rename(final)
        except OSError:  # another process finished first: theirs is identical
            if not final.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def _build_tokenizer():
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + WORDS + PUNCTUATION + [str(d) for d in range(256)])}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.normalizer = normalizers.Lowercase()
    # newlines are tokens (PaliGemma prompts end with one), other whitespace separates words
    core.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(r"[ \t]+"), behavior="removed"),
            pre_tokenizers.Split("\n", behavior="isolated"),
            pre_tokenizers.Punctuation(behavior="isolated"),
        ]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token="<pad>",
        eos_token="<eos>",
        bos_token="<bos>",
        unk_token="<unk>",
        extra_special_tokens={
            "image_token": "<image>",
            "fake_image_token": "<fake_token_around_image>",
            "global_image_token": "<global-img>",
            "end_of_utterance_token": "<end_of_utterance>",
            "video_token": "<video>",
        },
    )


def tokenizer_dir() -> Path:
    """A local tokenizer directory ``AutoTokenizer.from_pretrained`` loads (LeRobot's tokenizer step)."""
    version = hashlib.sha256(json.dumps([SPECIAL_TOKENS, WORDS, PUNCTUATION]).encode()).hexdigest()[:12]
    return atomic_dir(cache_dir() / f"tokenizer-{version}", lambda d: _build_tokenizer().save_pretrained(d))


def tokenizer_vocab_size() -> int:
    return len(SPECIAL_TOKENS) + len(WORDS) + len(PUNCTUATION) + 256


# --- pi0 / pi0.5 -----------------------------------------------------------------------------------


@contextlib.contextmanager
def reduced_paligemma(modeling_module, size: ReducedSize):
    """While LeRobot's pi0 / pi05 model is constructed, give it ``size``'s Gemma widths and SigLIP tower.

    ``modeling_module`` is ``lerobot.policies.pi0.modeling_pi0`` or ``...pi05.modeling_pi05``.
    """
    from unittest import mock

    from transformers.models.auto import CONFIG_MAPPING

    def gemma_config(variant: str):
        width = size.vlm_width if variant == "gemma_2b" else size.expert_width
        return modeling_module.GemmaConfig(
            width=width,
            depth=size.vlm_depth,
            mlp_dim=2 * width,
            num_heads=size.num_heads,
            num_kv_heads=1,
            head_dim=size.head_dim,
        )

    def paligemma_config():
        cfg = CONFIG_MAPPING["paligemma"]()
        v = cfg.vision_config
        v.hidden_size, v.num_hidden_layers = size.vision_width, size.vision_depth
        v.num_attention_heads, v.patch_size = size.vision_heads, size.patch_size
        return cfg

    mapping = {"paligemma": paligemma_config, "gemma": CONFIG_MAPPING["gemma"]}
    with (
        mock.patch.object(modeling_module, "get_gemma_config", gemma_config),
        mock.patch.object(modeling_module, "CONFIG_MAPPING", mapping),
    ):
        yield


def finish_reduced_paligemma(paligemma_with_expert, size: ReducedSize) -> None:
    """After construction: the stand-in tokenizer's vocabulary, and a projector to the reduced width.

    LeRobot fixes the SigLIP projection to 2048 (gemma_2b's width) and the vocabulary to 257 152.
    """
    import torch
    from torch import nn
    from transformers.models.paligemma.modeling_paligemma import PaliGemmaMultiModalProjector

    vocab = tokenizer_vocab_size()
    pg = paligemma_with_expert.paligemma
    pg.resize_token_embeddings(vocab)
    pg.config.vision_config.projection_dim = size.vlm_width
    pg.model.multi_modal_projector = PaliGemmaMultiModalProjector(pg.config)
    expert = paligemma_with_expert.gemma_expert
    expert.lm_head = nn.Linear(size.expert_width, vocab, bias=False)  # unused by the policy; kept small
    expert.config.vocab_size = vocab
    dtype = next(p.dtype for n, p in pg.named_parameters() if "language_model.layers" in n)
    if dtype == torch.bfloat16:  # LeRobot keeps the vision path in float32, the rest in bf16
        expert.lm_head.to(torch.bfloat16)


# --- SmolVLA ---------------------------------------------------------------------------------------


def write_smolvlm_dir(d: Path, text_config: dict, vision_config: dict, scale_factor: int) -> None:
    """Write a SmolVLM config with these text / vision configs, the stand-in tokenizer and a processor
    into ``d``: what LeRobot's SmolVLA reads from ``vlm_model_name`` (``AutoConfig``, ``AutoProcessor``)."""
    from transformers import SmolVLMConfig, SmolVLMImageProcessor, SmolVLMProcessor, SmolVLMVideoProcessor

    tok = _build_tokenizer()
    tok.save_pretrained(d)
    SmolVLMConfig(
        text_config=dict(text_config, pad_token_id=tok.pad_token_id),
        vision_config=dict(vision_config),
        scale_factor=scale_factor,
        image_token_id=tok.convert_tokens_to_ids("<image>"),
        vocab_size=text_config["vocab_size"],
    ).save_pretrained(d)
    side = vision_config["image_size"]
    seq = (side // vision_config["patch_size"]) ** 2 // scale_factor**2  # tokens per image after pixel shuffle
    image_processor = SmolVLMImageProcessor(
        do_resize=False, do_image_splitting=False, max_image_size={"longest_edge": side}
    )
    SmolVLMProcessor(
        image_processor=image_processor,
        tokenizer=tok,
        video_processor=SmolVLMVideoProcessor(),
        image_seq_len=max(seq, 1),
    ).save_pretrained(d)


def smolvlm_dir(size: ReducedSize) -> Path:
    """A local ``vlm_model_name`` for SmolVLA: tiny SmolVLM config, the stand-in tokenizer, a processor."""
    text = {
        "model_type": "llama",
        "hidden_size": size.vlm_width,
        "intermediate_size": 2 * size.vlm_width,
        "num_hidden_layers": size.vlm_depth,
        "num_attention_heads": size.num_heads,
        "num_key_value_heads": 1,
        "head_dim": size.head_dim,
        "vocab_size": tokenizer_vocab_size(),
        "max_position_embeddings": 512,
    }
    vision = {
        "hidden_size": size.vision_width,
        "intermediate_size": 2 * size.vision_width,
        "num_hidden_layers": size.vision_depth,
        "num_attention_heads": size.vision_heads,
        "patch_size": size.patch_size,
        "image_size": size.image_size,
    }
    return atomic_dir(cache_dir() / f"smolvlm-{size.digest()}", lambda d: write_smolvlm_dir(d, text, vision, 2))
