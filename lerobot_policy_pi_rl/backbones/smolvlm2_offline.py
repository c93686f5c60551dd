"""SmolVLM2-500M's architecture as a local ``vlm_model_name`` directory, for a full-size SmolVLA
built without the hub.

LeRobot's SmolVLA reads its VLM's architecture with ``AutoConfig.from_pretrained(vlm_model_name)``
(default ``HuggingFaceTB/SmolVLM2-500M-Video-Instruct``), even when it loads no VLM weights. Where
the hub is out of reach (these build machines), ``pirl-bench infer --backbone smolvla --size full
--smolvlm-config offline`` points ``vlm_model_name`` at the directory written here instead: the same
widths and depths with random weights, so what is timed is the released architecture as
reconstructed below.

The values below are SmolVLM2-500M's published architecture (text model: SmolLM2-360M; vision:
SigLIP base, patch 16, 512 px; pixel shuffle 4), written out by hand because its config.json could
not be read from here, so they are a reconstruction: ``tests/plugin/test_vla_backbones.py`` checks that
the SmolVLA built on them has SmolVLA's published size (about 0.45 B parameters with LeRobot's
default 16 of the 32 text layers). The tokenizer is the project's stand-in (``reduced.py``): token
ids stay inside the 49 280-row embedding, so shapes and cost are the real model's; the words it
knows are not.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from lerobot_policy_pi_rl.backbones import reduced

HUB_ID = "HuggingFaceTB/SmolVLM2-500M-Video-Instruct"

TEXT = {  # SmolLM2-360M (Llama architecture)
    "model_type": "llama",
    "hidden_size": 960,
    "intermediate_size": 2560,
    "num_hidden_layers": 32,
    "num_attention_heads": 15,
    "num_key_value_heads": 5,
    "head_dim": 64,
    "vocab_size": 49280,
    "rms_norm_eps": 1e-5,
    "rope_theta": 100000.0,
    "max_position_embeddings": 8192,
    "tie_word_embeddings": False,
}
VISION = {  # SigLIP base patch16, 512 px
    "model_type": "smolvlm_vision",
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "patch_size": 16,
    "image_size": 512,
}
SCALE_FACTOR = 4  # pixel shuffle: (512 / 16)^2 / 4^2 = 64 tokens per image


def smolvlm2_500m_dir() -> Path:
    """A local directory ``AutoConfig`` / ``AutoProcessor`` / ``AutoTokenizer`` load as SmolVLM2-500M."""
    spec = json.dumps(
        [TEXT, VISION, SCALE_FACTOR, reduced.SPECIAL_TOKENS, reduced.WORDS, reduced.PUNCTUATION], sort_keys=True
    )
    digest = hashlib.sha256(spec.encode()).hexdigest()[:12]
    return reduced.atomic_dir(
        reduced.cache_dir() / f"smolvlm2-500m-offline-{digest}",
        lambda d: reduced.write_smolvlm_dir(d, TEXT, VISION, SCALE_FACTOR),
    )
