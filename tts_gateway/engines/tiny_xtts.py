"""Build a tiny random-weight XTTS v2 checkpoint (same files and loading path as the real one).

Real XTTS v2 weights cannot be downloaded everywhere (no model hub in CI), so tests and CI run
the real XTTS code on this checkpoint: a 2-layer, 64-wide GPT with the v2 perceiver resampler,
the full HiFi-GAN decoder and speaker encoder, a character-level BPE vocabulary with the
special and language tokens, the 16 XTTS v2 languages, and a ``speakers_xtts.pth`` with three studio
speakers (random latents of the real shapes). It speaks noise, in the right shapes.
"""

from __future__ import annotations

import json
import string
from pathlib import Path
from typing import Any

# Three of XTTS v2's 58 studio speakers (names only: their latents here are random).
TINY_SPEAKERS = ("Claribel Dervla", "Ana Florence", "Viktor Eka")
XTTS_LANGUAGES = ["en", "es", "fr", "de", "it", "pt", "pl", "tr", "ru", "nl", "cs", "ar", "zh-cn", "ja", "hu", "ko"]
SPECIAL = ["[STOP]", "[UNK]", "[SPACE]", "[START]"]
# Characters left after XTTS's cleaners (lower-cased; zh → pinyin, ja → romaji, ko → romanised).
CHARS = (
    string.ascii_lowercase + string.digits + ".,!?;:'\"-()¿¡«»…"
    + "àáâãäåæçèéêëìíîïñòóôõöøùúûüýÿœßğışőűčďěňřšťůž"
    + "абвгдеёжзийклмнопрстуфхцчшщъыьэюя"
    + "ابتثجحخدذرزسشصضطظعغفقكلمنهويءآأؤإئةى"
)


def build_vocab() -> str:
    """A tokenizers BPE vocabulary (no merges): one token per special, language and character."""
    from tokenizers import Tokenizer
    from tokenizers.models import BPE
    from tokenizers.pre_tokenizers import Split

    tokens = SPECIAL + [f"[{lang}]" for lang in XTTS_LANGUAGES] + sorted(set(CHARS))
    vocab = {token: index for index, token in enumerate(tokens)}
    tokenizer = Tokenizer(BPE(vocab=vocab, merges=[], unk_token="[UNK]"))  # noqa: S106 - a token, not a password
    tokenizer.add_special_tokens(SPECIAL + [f"[{lang}]" for lang in XTTS_LANGUAGES])
    tokenizer.pre_tokenizer = Split(pattern="", behavior="isolated")
    return str(tokenizer.to_str())


# XTTS v2's real dimensions (GPT 30 layers × 1024 channels × 16 heads, 1026 audio tokens): random weights at
# the real size, to measure real costs. Random weights never emit the stop token, so every sentence makes
# the capped number of audio tokens (72: about 3.3 s of audio).
V2_SIZE: dict[str, Any] = {"layers": 30, "width": 1024, "heads": 16, "gpt_num_audio_tokens": 1026,
                           "gpt_start_audio_token": 1024, "gpt_stop_audio_token": 1025}
V2_MAX_AUDIO_TOKENS = 72


def build_tiny_xtts(directory: Path, *, seed: int = 0, max_audio_tokens: int = 48, layers: int = 2, width: int = 64,
                    heads: int = 4, **model_args: Any) -> Path:
    """Write config.json, vocab.json, model.pth (``{"model": state_dict}``) and speakers_xtts.pth to
    ``directory``. ``layers``/``width``/``heads`` size the GPT (XTTS v2: 30, 1024, 16; the benchmarks
    build that size to measure real costs); ``model_args`` set further XttsArgs fields."""
    import torch

    from tts_gateway.engines.torch_compat import import_torchaudio

    import_torchaudio()
    from TTS.tts.configs.xtts_config import XttsConfig
    from TTS.tts.layers.xtts.tokenizer import VoiceBpeTokenizer
    from TTS.tts.models.xtts import Xtts

    directory.mkdir(parents=True, exist_ok=True)
    vocab_path = directory / "vocab.json"
    vocab_path.write_text(build_vocab())
    tokenizer = VoiceBpeTokenizer(str(vocab_path))
    vocab = tokenizer.tokenizer.get_vocab()

    config = XttsConfig()
    config.languages = list(XTTS_LANGUAGES)
    args = config.model_args
    args.gpt_layers = layers
    args.gpt_n_model_channels = width
    args.gpt_n_heads = heads
    args.decoder_input_dim = width  # the decoder reads GPT latents: must equal the GPT width
    args.gpt_use_perceiver_resampler = True  # as v2: latents [1, 32, dim]
    args.gpt_max_audio_tokens = max_audio_tokens  # every generation runs to this cap (stop is masked below)
    args.gpt_number_text_tokens = tokenizer.get_number_tokens()
    args.gpt_start_text_token = vocab["[START]"]
    args.gpt_stop_text_token = vocab["[STOP]"]
    args.tokenizer_file = ""
    for key, value in model_args.items():
        if not hasattr(args, key):
            raise TypeError(f"XttsArgs has no field {key!r}")
        setattr(args, key, value)

    torch.manual_seed(seed)
    model = Xtts(config)
    model.tokenizer = tokenizer
    model.init_models()
    with torch.no_grad():  # random weights would stop early for ~5 % of seeds: lengths must not depend on the seed
        model.gpt.mel_head.bias[args.gpt_stop_audio_token] = -1e4
    torch.save({"model": model.state_dict()}, directory / "model.pth")
    # As XTTS v2's speakers_xtts.pth: name → {gpt_cond_latent [1, 32, width], speaker_embedding [1, 512, 1]}.
    speakers = {
        name: {"gpt_cond_latent": torch.randn(1, 32, args.gpt_n_model_channels),
               "speaker_embedding": torch.nn.functional.normalize(torch.randn(1, 512, 1), dim=1)}
        for name in TINY_SPEAKERS
    }
    torch.save(speakers, directory / "speakers_xtts.pth")
    config.save_json(str(directory / "config.json"))
    (directory / "README.txt").write_text(
        "Tiny random-weight XTTS v2 checkpoint built by `tts-gateway dev tiny-xtts` for tests.\n"
        "It produces noise, not speech. Languages: " + json.dumps(XTTS_LANGUAGES) + "\n"
    )
    return directory
