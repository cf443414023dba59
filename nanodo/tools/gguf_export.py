"""`nanodo export --format=gguf`: a Llama or Qwen3 run as one GGUF file (llama.cpp, Ollama)."""

import os

import jax
import numpy as np
import sentencepiece as spm

from nanodo.ground import files, tree
from nanodo.infra import workdir
from nanodo.model import head_dim
from nanodo.tools import hf_families, hf_tensors, trained

NEEDS = "needs the gguf package: pip install 'nanodo[gguf]'"
DTYPES = ('float32', 'float16')


def _refusal(name: str, model: dict, vocab: str) -> str | None:
  """Why a run of family name, with the tokenizer in vocab, has no GGUF; None if it has one."""
  if name not in ('llama', 'qwen3'):
    return f'GGUF export writes the llama and qwen3 families; this run is {name}'
  if model['bias'] != 'none':
    return f'GGUF export writes models without biases; this run has model.bias={model["bias"]!r}'
  if model['rope_scaling']:
    scaling = f'model.rope_scaling={model["rope_scaling"]!r}'
    return f"GGUF export writes plain RoPE; this run has {scaling} (llama.cpp's rope_freqs)"
  if vocab.endswith('.json'):
    why = 'its pre-tokenizer has no name llama.cpp knows for certain'
    return (
      f'GGUF export writes SentencePiece tokenizers; this run has {os.path.basename(vocab)} ({why})'
    )
  return None


def _tokenizer(w, sp: spm.SentencePieceProcessor, V: int) -> None:
  """SentencePiece's pieces, scores and kinds, as llama.cpp's 'llama' tokenizer; no space prefix."""
  import gguf

  kinds = gguf.TokenType

  def kind(i: int) -> gguf.TokenType:
    checks = [
      (sp.is_unknown, kinds.UNKNOWN),
      (sp.is_control, kinds.CONTROL),
      (sp.is_byte, kinds.BYTE),
    ]
    return next((k for is_kind, k in checks if is_kind(i)), kinds.NORMAL)

  n = sp.vocab_size()
  w.add_tokenizer_model('llama')
  w.add_token_list([sp.id_to_piece(i) for i in range(n)] + [f'[PAD{i}]' for i in range(n, V)])
  w.add_token_scores([sp.get_score(i) for i in range(n)] + [0.0] * (V - n))
  w.add_token_types([kind(i) for i in range(n)] + [kinds.UNUSED] * (V - n))
  w.add_bos_token_id(sp.bos_id())
  w.add_eos_token_id(sp.eos_id())
  if sp.unk_id() >= 0:
    w.add_unk_token_id(sp.unk_id())
  if sp.pad_id() >= 0:
    w.add_pad_token_id(sp.pad_id())
  w.add_add_bos_token(True)  # nanodo starts every example with BOS
  w.add_add_space_prefix(False)  # nanodo's SentencePiece models add no dummy prefix


def _permuted(w_OxI: np.ndarray, heads: int) -> np.ndarray:
  """q or k rows in llama.cpp's order for Llama: the two rotary halves of each head interleaved."""
  return w_OxI.reshape(heads, 2, -1, w_OxI.shape[1]).swapaxes(1, 2).reshape(w_OxI.shape)


def export(
  path: str, out: str, dtype: str = 'float32', step: int | None = None, variant: int | None = None
) -> str:
  """Writes the run in path (a checkpoint; default: the latest) to the file out as GGUF.

  Returns the family. Refuses (ValueError, writing nothing) a family or tokenizer GGUF cannot
  express here, an out that exists, a dtype not in DTYPES, a program of several processes.
  """
  trained.one_process(f'nanodo export --workdir={path} --out={out} --format=gguf --dtype={dtype}')
  if dtype not in DTYPES:
    raise ValueError(f'dtype={dtype!r} is not valid: one of {list(DTYPES)} for GGUF.')
  c = workdir.run_config(trained.variant_of(path, variant)[0])
  name, vocab = hf_families.family(c.model), trained.tokenizer_path(c) or ''
  if why := _refusal(name, c.model, vocab):
    raise ValueError(f'{why}: export it as a Hugging Face directory (no --format).')
  if os.path.exists(out):
    raise ValueError(f'out={out!r} exists; give a new file name.')
  try:
    import gguf
  except ImportError:
    raise ValueError(f'nanodo export --format=gguf {NEEDS}') from None
  run = trained.load(path, step, variant)
  cfg, sp = run.cfg, run.sp
  tensors = hf_tensors.to_hf(cfg, name, tree.by_path(jax.device_get(run.params)))
  names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[name.upper()], cfg.N)
  KV, weights = cfg.KV or cfg.H, np.float16 if dtype == 'float16' else np.float32
  with files.replaced(out) as tmp:
    w = gguf.GGUFWriter(tmp, name)
    w.add_name(os.path.basename(os.path.normpath(path)))
    file_type = gguf.LlamaFileType.MOSTLY_F16 if dtype == 'float16' else gguf.LlamaFileType.ALL_F32
    w.add_file_type(file_type)
    w.add_vocab_size(cfg.V)
    w.add_context_length(cfg.L)
    w.add_embedding_length(cfg.D)
    w.add_block_count(cfg.N)
    w.add_feed_forward_length(cfg.F)
    w.add_head_count(cfg.H)
    w.add_head_count_kv(KV)
    w.add_key_length(head_dim(cfg))
    w.add_value_length(head_dim(cfg))
    w.add_rope_dimension_count(head_dim(cfg))
    w.add_rope_freq_base(cfg.rope_base)
    w.add_layer_norm_rms_eps(cfg.norm_eps)
    _tokenizer(w, sp, cfg.V)
    for hf, x in tensors.items():
      x = np.asarray(x, np.float32)
      if name == 'llama' and hf.endswith(('q_proj.weight', 'k_proj.weight')):
        x = _permuted(x, cfg.H if 'q_proj' in hf else KV)
      # Norm scales stay float32 in a float16 file, as llama.cpp's converter keeps them.
      x = np.ascontiguousarray(x.astype(weights) if x.ndim > 1 else x)
      w.add_tensor(names.get_name(hf, try_suffixes=('.weight',)), x)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
  return name
