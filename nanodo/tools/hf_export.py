"""`nanodo export`: a trained run as a Hugging Face model directory (GPT-2, Llama, Qwen2, Qwen3)."""

import json
import os
import shutil

import jax
import numpy as np
import sentencepiece as spm

from nanodo.corpora import tokenizer
from nanodo.ground import files, tree
from nanodo.infra import workdir
from nanodo.tools import hf_families, hf_tensors, trained


def _tokenizer_config(sp: spm.SentencePieceProcessor, L: int) -> dict:
  """tokenizer_config.json: the special pieces; those in a text are text, as in SentencePiece."""
  ids = {'bos': sp.bos_id(), 'eos': sp.eos_id(), 'unk': sp.unk_id(), 'pad': sp.pad_id()}
  pieces = {f'{k}_token': sp.id_to_piece(i) for k, i in ids.items() if i >= 0}
  return {'tokenizer_class': 'PreTrainedTokenizerFast', **pieces, 'model_max_length': L} | {
    'clean_up_tokenization_spaces': False,
    'split_special_tokens': True,
  }


def export(path: str, out: str, step: int | None = None, variant: int | None = None) -> str:
  """Writes the run in path (a checkpoint; default: the latest; of a sweep, variant's) to out
  as a Hugging Face model.

  Returns the family. out must be absent or empty: it is written beside it, then renamed when
  whole, so that a failure leaves it as it was. One process writes it: ValueError in a program
  of several (jax.distributed).
  """
  trained.one_process(f'nanodo export --workdir={path} --out={out}')
  name = hf_families.family(workdir.run_config(trained.variant_of(path, variant)[0]).model)
  if os.path.exists(out) and not (os.path.isdir(out) and not os.listdir(out)):
    raise ValueError(f'out={out!r} exists and is not empty; give a new or empty directory.')
  try:
    from safetensors.numpy import save_file
  except ImportError:
    raise ValueError(f'nanodo export {hf_families.NEEDS}') from None
  run = trained.load(path, step, variant)
  vocab, sp = trained.tokenizer_path(run.config), run.sp
  config = hf_families.hf_config(run.cfg, name, sp)
  kept, imported = os.path.dirname(vocab), vocab.endswith('.json')
  if imported:  # an imported model's own files, verbatim, and its config.json's keys
    copied = [n for n in sorted(os.listdir(kept)) if n != 'config.json']
    texts = {'config.json': {**config, **_original_config(kept), 'dtype': 'float32'}}
  else:
    copied, texts = (
      [],
      {
        'config.json': config,
        'generation_config.json': {k: v for k, v in config.items() if k.endswith('_token_id')},
        'tokenizer.json': tokenizer.hf_tokenizer(vocab),
        'tokenizer_config.json': _tokenizer_config(sp, run.cfg.L),
      },
    )
  tensors = hf_tensors.to_hf(run.cfg, name, tree.by_path(jax.device_get(run.params)))
  # Contiguous: safetensors writes an array's memory as it lies, whatever its strides.
  tensors = {k: np.ascontiguousarray(v, np.float32) for k, v in tensors.items()}
  with files.replaced(out) as tmp:  # replaces an empty directory
    os.makedirs(tmp)
    for file, content in texts.items():
      with open(os.path.join(tmp, file), 'w', encoding='utf-8') as f:
        json.dump(content, f, indent=2, ensure_ascii=False)
    save_file(tensors, os.path.join(tmp, 'model.safetensors'), metadata={'format': 'pt'})
    for file in copied:
      shutil.copyfile(os.path.join(kept, file), os.path.join(tmp, file))
    if not imported:  # SentencePiece's own model, for an import
      shutil.copyfile(vocab, os.path.join(tmp, workdir.TOKENIZER))
  return name


def _original_config(kept: str) -> dict:
  """The config.json of the model a run was started from, without its dtype (ours is float32)."""
  try:
    with open(os.path.join(kept, 'config.json'), encoding='utf-8') as f:
      return {k: v for k, v in json.load(f).items() if k not in ('dtype', 'torch_dtype')}
  except FileNotFoundError:
    return {}
  except (OSError, ValueError) as e:
    raise ValueError(f'{os.path.join(kept, "config.json")} is unreadable ({e}).') from None
