"""Tokenizers for our models: an HF folder's own, or one built from a GGUF file's metadata.

A GGUF carries no tokenizer.json: its vocabulary, merges, token types, special ids and chat
template are metadata. For a byte-level BPE vocabulary (`tokenizer.ggml.model = "gpt2"`, as
SmolLM2, Llama 3 and Qwen write) `from_gguf` rebuilds the tokenizer with `tokenizers` alone
(a SentencePiece one, 'llama' as Mistral and Gemma write, goes through transformers' torch-free
GGUF converter):

  model          BPE over the file's tokens and merges (byte-level spelling);
  pre-tokenizer  the regex splits llama.cpp applies for `tokenizer.ggml.pre` (its table in
                 src/llama-vocab.cpp), then the byte-level mapping;
  added tokens   every CONTROL token as a special token, every USER_DEFINED one as a plain added
                 token (both matched whole in text, as llama.cpp does);
  wrapper        `transformers.PreTrainedTokenizerFast` with BOS/EOS/PAD/UNK from the metadata and
                 the file's chat template, so `apply_chat_template` works without torch
                 (transformers' own GGUF route imports torch).

Example:
  >>> tok = load_tokenizer("smollm2")
  >>> tok.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True,
  ...                         tokenize=False)
  '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, ...<|im_start|>assistant\\n'
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from typing import Optional

from doran_jax import paths
from doran_jax.errors import CheckpointError
from doran_jax.files import inside
from doran_jax.models import gguf_io, hf_io

# llama.cpp's GPT-2 split (and the tail of several others).
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_LLAMA3 = (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+"
           r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2 = (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+"
          r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_GPT4O = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
          r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+"
          r"[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?|\p{N}{1,3}"
          r"| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_TEKKEN = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
           r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
           r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# tokenizer.ggml.pre -> (llama.cpp's regex splits, applied in turn; whether a word that is itself
# a token skips the merges (llama.cpp's ignore_merges, set for the Llama 3 family)).
PRE_TOKENIZERS = {
    # llama.cpp's fallback for files that name no (or an unlisted older) pre-tokenizer.
    "default": ((r"[\p{P}\$\+<=>\^~\|]+", _GPT2, r"\p{N}+", r"[0-9][0-9][0-9]"), False),
    **{name: ((_GPT2,), False) for name in ("gpt-2", "gpt2", "phi-2", "jina-es", "jina-de",
                                            "olmo", "mpt", "jais", "trillion")},
    **{name: ((r"\p{N}", _GPT2), False) for name in ("smollm", "starcoder", "refact", "command-r",
                                                     "codeshell", "exaone", "minerva-7b")},
    **{name: ((_LLAMA3,), True) for name in ("llama3", "llama-v3", "llama-bpe", "falcon3",
                                             "pixtral", "dbrx", "smaug-bpe")},
    **{name: ((_QWEN2,), False) for name in ("qwen2", "stablelm2", "deepseek-r1-qwen")},
    **{name: ((_GPT4O,), False) for name in ("gpt-4o", "llama4")},
    "tekken": ((_TEKKEN,), False),
}


def _byte_spelling() -> dict[int, str]:
  from transformers.convert_slow_tokenizer import bytes_to_unicode
  return bytes_to_unicode()


def from_gguf(path, ckpt: Optional["gguf_io.GGUFCheckpoint"] = None):
  """A `PreTrainedTokenizerFast` built from a GGUF file's tokenizer metadata (byte-level BPE).

  Args:
    path: the .gguf file.
    ckpt: the file already opened with `gguf_io.open_gguf` (saves parsing it twice).

  Example:
    >>> tok = from_gguf("SmolLM2-135M-Instruct.Q4_1.gguf")
    >>> tok("Hello world")["input_ids"]
    [19556, 905]
  """
  import tokenizers
  from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors
  from transformers import PreTrainedTokenizerFast

  ckpt = ckpt or gguf_io.open_gguf(path)
  kind = ckpt.value("tokenizer.ggml.model")
  if kind == "llama":
    return _sentencepiece(ckpt)
  if kind != "gpt2":
    raise CheckpointError(
        f"{ckpt.path!r}: tokenizer.ggml.model is {kind!r}; we build byte-level BPE ('gpt2': "
        "SmolLM2, Llama 3, Qwen) and SentencePiece ('llama': Mistral, Gemma) tokenizers from a "
        "GGUF. Pass the model's HF folder as model.tokenizer instead.")
  pre = ckpt.value("tokenizer.ggml.pre", "default")
  if pre not in PRE_TOKENIZERS:
    raise CheckpointError(
        f"{ckpt.path!r}: tokenizer.ggml.pre {pre!r} is not in our table of llama.cpp's "
        f"pre-tokenizers ({', '.join(sorted(PRE_TOKENIZERS))}); pass the model's HF folder as "
        "model.tokenizer instead.")
  tokens = ckpt.value("tokenizer.ggml.tokens") or []
  merges = ckpt.value("tokenizer.ggml.merges") or []
  types = ckpt.value("tokenizer.ggml.token_type") or [gguf_io.NORMAL] * len(tokens)
  if not tokens or len(types) != len(tokens):
    raise CheckpointError(f"{ckpt.path!r}: tokenizer.ggml.tokens ({len(tokens)}) and "
                          f"tokenizer.ggml.token_type ({len(types)}) do not describe one "
                          "vocabulary.")

  spelling = _byte_spelling()
  alphabet = set(spelling.values())
  vocab = {}
  for i, (token, kind_i) in enumerate(zip(tokens, types)):
    # Control and user-defined tokens are matched whole as added tokens and keep their text; a
    # normal token written in raw UTF-8 (not the byte alphabet) is spelled byte by byte.
    if kind_i not in (gguf_io.CONTROL, gguf_io.USER_DEFINED) and not set(token) <= alphabet:
      token = "".join(spelling[b] for b in token.encode("utf-8"))
    vocab.setdefault(token, i)
  pairs = []
  for merge in merges:
    parts = merge.split(" ")
    if len(parts) != 2:
      raise CheckpointError(f"{ckpt.path!r}: merge {merge!r} is not two tokens separated by a "
                            "space.")
    pairs.append(tuple(parts))

  splits, ignore_merges = PRE_TOKENIZERS[pre]
  tok = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=pairs, ignore_merges=ignore_merges,
                                        fuse_unk=False, byte_fallback=False))
  tok.pre_tokenizer = pre_tokenizers.Sequence(
      [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in splits]
      + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
  tok.decoder = decoders.ByteLevel()
  tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                          for t, k in zip(tokens, types) if k == gguf_io.CONTROL])
  tok.add_tokens([AddedToken(t, special=False, normalized=False)
                  for t, k in zip(tokens, types) if k == gguf_io.USER_DEFINED])

  def special_id(key):
    token_id = ckpt.value(f"tokenizer.ggml.{key}")
    return token_id if token_id is not None and 0 <= token_id < len(tokens) else None

  def special(key):
    token_id = special_id(key)
    return None if token_id is None else tokens[token_id]

  bos, eos = special("bos_token_id"), special("eos_token_id")
  add_bos = bool(ckpt.value("tokenizer.ggml.add_bos_token", False)) and bos is not None
  add_eos = bool(ckpt.value("tokenizer.ggml.add_eos_token", False)) and eos is not None
  if add_bos or add_eos:
    def side(seq, text):
      return ([f"{bos}:{seq}"] if add_bos else []) + [text] + ([f"{eos}:{seq}"] if add_eos else [])
    single = " ".join(side(0, "$A:0"))
    pair = " ".join(side(0, "$A:0") + side(1, "$B:1"))
    specials = [(tokens[special_id(key)], special_id(key))
                for key, on in (("bos_token_id", add_bos), ("eos_token_id", add_eos)) if on]
    tok.post_processor = processors.TemplateProcessing(single=single, pair=pair,
                                                       special_tokens=specials)
  return PreTrainedTokenizerFast(
      tokenizer_object=tok, bos_token=bos, eos_token=eos, unk_token=special("unknown_token_id"),
      pad_token=special("padding_token_id"), chat_template=ckpt.value("tokenizer.chat_template"),
      model_max_length=int(ckpt.config["max_position_embeddings"]),
      clean_up_tokenization_spaces=False)


def _sentencepiece(ckpt: "gguf_io.GGUFCheckpoint"):
  """A SentencePiece vocabulary ('llama': Mistral, Gemma files) through transformers' own GGUF
  converter, which needs no torch (only its model-loading route does); wrapped as `from_gguf`
  wraps the BPE one, with the file's special tokens, BOS/EOS flags and chat template."""
  from transformers import PreTrainedTokenizerFast
  from transformers.integrations.gguf.gguf_tokenizer_mapping import (convert_gguf_tokenizer,
                                                                     get_gguf_tokenizer)
  try:
    architecture, tokenizer_dict, tokenizer_config = get_gguf_tokenizer(ckpt.path)
    backend, extra = convert_gguf_tokenizer(architecture, tokenizer_dict)
  except (KeyError, ValueError, IndexError) as e:
    raise CheckpointError(f"{ckpt.path!r}: its SentencePiece tokenizer metadata cannot be "
                          f"converted ({type(e).__name__}: {e}).") from e
  return PreTrainedTokenizerFast(
      tokenizer_object=backend, **{**tokenizer_config, **extra},
      model_max_length=int(ckpt.config["max_position_embeddings"]))


def from_path(path: str):
  """The tokenizer of a resolved model path: a GGUF file's rebuilt one, else transformers'
  AutoTokenizer of the folder (`models.load_tokenizer` resolves names such as 'smollm2' first).
  A URL folder's tokenizer files are copied to a local folder first (`local_copy`).

  Example:
    >>> tok = from_path(models.resolve("smollm2"))
    >>> tok.eos_token, tok.pad_token
    ('<|im_end|>', '<|im_end|>')
  """
  if gguf_io.is_gguf(path):
    return from_gguf(path)
  if paths.is_remote(path):
    path = local_copy(path)
  if os.path.isdir(path):
    check_tokenizer_files(path)
  from transformers import AutoTokenizer
  return AutoTokenizer.from_pretrained(path)


# What transformers' tokenizer loading may open in a folder: tokenizer.json, tokenizer_config.json,
# special_tokens_map.json, config.json, vocab.txt / vocab.json, merges.txt, *.model (SentencePiece),
# chat_template.jinja, *.tiktoken and the additional_chat_templates/ folder.
_TOKENIZER_SUFFIXES = (".json", ".txt", ".model", ".jinja", ".tiktoken")
_TEMPLATES_DIR = "additional_chat_templates"


def check_tokenizer_files(folder: str) -> None:
  """Every tokenizer file of `folder` resolves inside it (`files.inside`), before transformers
  opens any: a tokenizer.json or tokenizer_config.json symlinked out is a CheckpointError.

  Example:
    >>> check_tokenizer_files("ckpt/")
  """
  names = [n for n in sorted(os.listdir(folder)) if n.endswith(_TOKENIZER_SUFFIXES)]
  if os.path.lexists(os.path.join(folder, _TEMPLATES_DIR)):
    templates = inside(folder, _TEMPLATES_DIR, what="tokenizer folder")
    if os.path.isdir(templates):
      names += [os.path.join(_TEMPLATES_DIR, n) for n in sorted(os.listdir(templates))]
  for name in names:
    inside(folder, name, what="tokenizer file")


def local_copy(url: str) -> str:
  """A fresh local folder holding the tokenizer files of the URL folder `url` (transformers'
  AutoTokenizer reads only local folders).

  The files copied are those transformers may open (`_TOKENIZER_SUFFIXES`, config.json included,
  and additional_chat_templates/), each name checked with `files.inside` (lexical for a URL: no
  '..' or absolute names); the weights are never copied. The folder lives until the process
  exits: a tokenizer may reread its vocabulary file when it is saved with a merged export.

  Example:
    >>> tok = AutoTokenizer.from_pretrained(local_copy("gs://my-bucket/llama-7b"))
  """
  names = [n for n in paths.listdir(url) if n.endswith(_TOKENIZER_SUFFIXES) and n != hf_io.INDEX]
  templates = paths.join(url, _TEMPLATES_DIR)
  if paths.isdir(templates):
    names += [f"{_TEMPLATES_DIR}/{n}" for n in paths.listdir(templates)]
  folder = tempfile.mkdtemp(prefix="doran-tokenizer-")
  atexit.register(shutil.rmtree, folder, True)
  for name in names:
    source = inside(url, name, what="tokenizer file")
    target = os.path.join(folder, *name.split("/"))
    os.makedirs(os.path.dirname(target), exist_ok=True)
    paths.download(source, target)
  return folder
