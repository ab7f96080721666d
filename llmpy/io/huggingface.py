"""Hugging Face GPT-2 folders (`config.json` + `model.safetensors`) in and out of llm.c's parameter layout.

A folder written by `GPT2LMHeadModel.save_pretrained` (or downloaded from the `gpt2` model page) holds
the weights under `transformer.` (or no prefix), with three differences from llm.c's layout:
  - the four linear layers are Conv1D, whose weights are stored (in, out): llm.c's (out, in) transposed;
  - the vocabulary has V rows where llm.c pads `wte` to Vp = V rounded up to 128 (zero rows);
  - the output layer is tied to `wte`; an `lm_head.weight` may be present and must equal it.
Only local files are read, through the `safetensors` package (never a pickle); F32, F16 and BF16 tensors
are read, F32 or BF16 written.
"""

from __future__ import annotations

import json
import os

import numpy as np

from llmpy.core.config import GPT2Config, end_of_text_token, pad_vocab
from llmpy.core.layout import parameter_buffer
from llmpy.io.formats import (FormatError, atomic_write_bytes, bfloat16_bits_to_float32, check_finite,
                              float32_to_bfloat16_bits, load_model)

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX_FILE = "model.safetensors.index.json"
PREFIX = "transformer."

# llm.c's per-layer tensors: Hugging Face name (under h.{l}.) and whether it is a Conv1D weight (transposed).
LAYER_TENSORS = {
    "ln1w": ("ln_1.weight", False), "ln1b": ("ln_1.bias", False),
    "qkvw": ("attn.c_attn.weight", True), "qkvb": ("attn.c_attn.bias", False),
    "attprojw": ("attn.c_proj.weight", True), "attprojb": ("attn.c_proj.bias", False),
    "ln2w": ("ln_2.weight", False), "ln2b": ("ln_2.bias", False),
    "fcw": ("mlp.c_fc.weight", True), "fcb": ("mlp.c_fc.bias", False),
    "fcprojw": ("mlp.c_proj.weight", True), "fcprojb": ("mlp.c_proj.bias", False),
}
MODEL_TENSORS = {"wte": "wte.weight", "wpe": "wpe.weight", "lnfw": "ln_f.weight", "lnfb": "ln_f.bias"}
# Buffers older exports carry (the causal mask), not parameters.
BUFFER_SUFFIXES = (".attn.bias", ".attn.masked_bias")
HEAD = "lm_head.weight"

# What llm.c's GPT-2 computes; a config asking for anything else is another model.
_REQUIRED = {"activation_function": ("gelu_new", "gelu_pytorch_tanh"), "scale_attn_weights": (True,),
             "scale_attn_by_inverse_layer_idx": (False,), "tie_word_embeddings": (True,), "add_cross_attention": (False,)}


def is_huggingface_folder(path) -> bool:
    return os.path.isdir(path)


def load_model_source(path) -> tuple[GPT2Config, np.ndarray]:
    """(config, flat float32 parameters) from an llm.c model file or a Hugging Face GPT-2 folder."""
    return read_huggingface(path) if is_huggingface_folder(path) else load_model(path)


# ----------------------------------------------------------------------------
# reading


def read_config(folder) -> GPT2Config:
    """The GPT2Config of a Hugging Face GPT-2 config.json (padded vocabulary as llm.c pads it)."""
    path = os.path.join(folder, CONFIG_FILE)
    try:
        with open(path, encoding="utf-8") as f:
            hf = json.load(f)
    except FileNotFoundError:
        raise FormatError(f"{path}: file not found (not a Hugging Face model folder?)") from None
    except (OSError, ValueError) as error:
        raise FormatError(f"{path}: cannot read the JSON config ({error})") from None
    if not isinstance(hf, dict) or hf.get("model_type") != "gpt2":
        found = hf.get("model_type") if isinstance(hf, dict) else type(hf).__name__
        raise FormatError(f"{path}: model_type: expected 'gpt2', found {found!r}")
    for key, allowed in _REQUIRED.items():
        if key in hf and hf[key] not in allowed:
            raise FormatError(f"{path}: {key}: expected {' or '.join(map(repr, allowed))} (GPT-2 as llm.c computes it), "
                              f"found {hf[key]!r}")
    if abs(float(hf.get("layer_norm_epsilon", 1e-5)) - 1e-5) > 1e-12:
        raise FormatError(f"{path}: layer_norm_epsilon: expected 1e-05 (llm.c's layernorm), found {hf['layer_norm_epsilon']}")
    fields = {}
    for key, name in (("n_positions", "max_seq_len"), ("vocab_size", "vocab_size"), ("n_layer", "num_layers"),
                      ("n_head", "num_heads"), ("n_embd", "channels")):
        value = hf.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise FormatError(f"{path}: {key}: expected a positive integer, found {value!r}")
        fields[name] = value
    if hf.get("n_inner") not in (None, 4 * fields["channels"]):
        raise FormatError(f"{path}: n_inner: expected null or 4*n_embd = {4 * fields['channels']}, found {hf['n_inner']}")
    try:
        return GPT2Config(padded_vocab_size=pad_vocab(fields["vocab_size"]), **fields)
    except ValueError as error:
        raise FormatError(f"{path}: {error}") from None


def _weight_files(folder) -> list[str]:
    """The safetensors files of the folder: model.safetensors, or the shards its index names."""
    single, index = os.path.join(folder, WEIGHTS_FILE), os.path.join(folder, WEIGHTS_INDEX_FILE)
    if os.path.isfile(single):
        return [single]
    if os.path.isfile(index):
        try:
            with open(index, encoding="utf-8") as f:
                names = sorted(set(json.load(f)["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
            raise FormatError(f"{index}: cannot read the shard index ({error})") from None
        return [os.path.join(folder, name) for name in names]
    pickles = [n for n in ("pytorch_model.bin", "model.pt") if os.path.exists(os.path.join(folder, n))]
    hint = (f" ({pickles[0]} is a pickle, which llmpy never loads; save the model again with "
            "save_pretrained(..., safe_serialization=True))") if pickles else ""
    raise FormatError(f"{single}: file not found{hint}")


def _read_tensors(folder) -> dict[str, tuple[np.ndarray, str]]:
    """Every tensor of the folder as float32 arrays, by name without the `transformer.` prefix, with its file."""
    from safetensors import SafetensorError, deserialize

    tensors: dict[str, tuple[np.ndarray, str]] = {}
    for path in _weight_files(folder):
        try:
            with open(path, "rb") as f:
                entries = deserialize(f.read())
        except FileNotFoundError:
            raise FormatError(f"{path}: file not found (named by {WEIGHTS_INDEX_FILE})") from None
        except (SafetensorError, OSError, ValueError) as error:
            raise FormatError(f"{path}: not a readable safetensors file ({error})") from None
        for name, entry in entries:
            array = _as_float32(path, name, entry)
            tensors[name[len(PREFIX):] if name.startswith(PREFIX) else name] = (array, path)
    return tensors


def _as_float32(path, name: str, entry: dict) -> np.ndarray:
    dtypes = {"F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": np.dtype("<u2")}
    dtype = dtypes.get(entry["dtype"])
    if dtype is None:
        raise FormatError(f"{path}: tensor {name}: dtype {entry['dtype']} is not one of F32, F16, BF16")
    values = np.frombuffer(entry["data"], dtype=dtype).reshape(entry["shape"])
    if entry["dtype"] == "BF16":
        return bfloat16_bits_to_float32(values)
    return values.astype(np.float32)


def _hf_names(config: GPT2Config) -> dict[str, list[tuple[str, bool]]]:
    """llm.c tensor -> the Hugging Face tensors (name, Conv1D?) it is made of, layer by layer."""
    names = {name: [(hf, False)] for name, hf in MODEL_TENSORS.items()}
    for name, (hf, conv1d) in LAYER_TENSORS.items():
        names[name] = [(f"h.{l}.{hf}", conv1d) for l in range(config.num_layers)]
    return names


def _llmc_part(params, name: str, layer: int, parts: list, vocab_size: int) -> np.ndarray:
    """The view of llm.c's tensor `name` that Hugging Face tensor `layer` of `parts` holds (wte: its real rows)."""
    if name == "wte":
        return params[name][:vocab_size]
    return params[name] if len(parts) == 1 else params[name][layer]


def read_huggingface(folder) -> tuple[GPT2Config, np.ndarray]:
    """(config, flat float32 parameters in llm.c's order, wte padded with zero rows) of a Hugging Face GPT-2
    folder; a missing, misshapen, unexpected or non-finite tensor is a FormatError naming it."""
    config = read_config(folder)
    tensors = _read_tensors(folder)
    params = parameter_buffer(config)
    V = config.vocab_size
    for name, parts in _hf_names(config).items():
        for l, (hf, conv1d) in enumerate(parts):
            into = _llmc_part(params, name, l, parts, V)
            if hf not in tensors:
                raise FormatError(f"{folder}: tensor {PREFIX}{hf}: missing from {', '.join(_weight_files(folder))}")
            values, path = tensors.pop(hf)
            expected = into.shape[::-1] if conv1d else into.shape
            if values.shape != expected:
                raise FormatError(f"{path}: tensor {PREFIX}{hf}: expected shape {list(expected)} "
                                  f"(config.json), found {list(values.shape)}")
            into[...] = values.T if conv1d else values
    _check_leftovers(folder, tensors, params.wte[:V])
    check_finite(folder, "the parameters", params.flat, config)
    return config, params.flat


def _check_leftovers(folder, tensors: dict, wte: np.ndarray) -> None:
    """What is left after the parameters: the causal-mask buffers, a tied head; anything else is another model."""
    for name, (values, path) in tensors.items():
        if name.endswith(BUFFER_SUFFIXES):
            continue
        if name == HEAD:
            if values.shape != wte.shape or not np.array_equal(values, wte):
                raise FormatError(f"{path}: tensor {HEAD}: differs from {PREFIX}wte.weight; llm.c's GPT-2 ties the "
                                  "output layer to the token embedding")
            continue
        raise FormatError(f"{path}: tensor {name}: not a GPT2LMHeadModel tensor (another architecture?)")


# ----------------------------------------------------------------------------
# writing


def huggingface_config(config: GPT2Config, dtype: str = "float32") -> dict:
    """config.json of GPT2LMHeadModel for `config` (dropout as GPT-2's; inference ignores it)."""
    eot = end_of_text_token(config.vocab_size)
    return {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": config.vocab_size,
            "n_positions": config.max_seq_len, "n_ctx": config.max_seq_len, "n_embd": config.channels,
            "n_layer": config.num_layers, "n_head": config.num_heads, "n_inner": None,
            "activation_function": "gelu_new", "layer_norm_epsilon": 1e-05, "initializer_range": 0.02,
            "resid_pdrop": 0.1, "embd_pdrop": 0.1, "attn_pdrop": 0.1, "scale_attn_weights": True,
            "scale_attn_by_inverse_layer_idx": False, "reorder_and_upcast_attn": False,
            "tie_word_embeddings": True, "bos_token_id": eot, "eos_token_id": eot, "use_cache": True,
            "dtype": dtype, "torch_dtype": dtype}


def huggingface_tensors(config: GPT2Config, params_flat: np.ndarray) -> dict[str, np.ndarray]:
    """Hugging Face tensor name -> contiguous float32 array (Conv1D weights transposed, wte unpadded)."""
    params = parameter_buffer(config, np.ascontiguousarray(params_flat, dtype=np.float32))
    tensors = {}
    for name, parts in _hf_names(config).items():
        for l, (hf, conv1d) in enumerate(parts):
            values = _llmc_part(params, name, l, parts, config.vocab_size)
            tensors[PREFIX + hf] = np.ascontiguousarray(values.T if conv1d else values)
    return tensors


def write_huggingface(folder, config: GPT2Config, params_flat: np.ndarray, dtype: str = "float32") -> list[str]:
    """Write a Hugging Face GPT-2 folder (config.json, model.safetensors; each file atomically) that
    `GPT2LMHeadModel.from_pretrained(folder)` loads; dtype float32 or bfloat16. Returns the paths written."""
    from safetensors import TensorSpec, serialize

    if dtype not in ("float32", "bfloat16"):
        raise ValueError(f"write_huggingface: dtype must be float32 or bfloat16, got {dtype!r}")
    if np.asarray(params_flat).size != config.num_parameters():
        raise ValueError(f"write_huggingface: {np.asarray(params_flat).size} parameters given, the config has "
                         f"{config.num_parameters()}")
    tensors = huggingface_tensors(config, params_flat)
    if dtype == "bfloat16":
        tensors = {name: float32_to_bfloat16_bits(values) for name, values in tensors.items()}
    # serialize reads the arrays through their pointers: `tensors` keeps them alive until it returns
    specs = {name: TensorSpec(dtype=dtype, shape=list(values.shape), data_ptr=values.ctypes.data,
                              data_len=values.nbytes) for name, values in tensors.items()}
    payload = serialize(specs, metadata={"format": "pt"})
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as error:
        raise OSError(error.errno, error.strerror, folder) from None
    weights, config_path = os.path.join(folder, WEIGHTS_FILE), os.path.join(folder, CONFIG_FILE)
    atomic_write_bytes(weights, payload)
    atomic_write_bytes(config_path, json.dumps(huggingface_config(config, dtype), indent=2).encode() + b"\n")
    return [config_path, weights]
