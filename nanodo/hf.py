"""Hugging Face model directories: a run exported to one; one imported as a run's step 0."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import sentencepiece as spm
from flax import nnx

from nanodo import hf_families, tokenizer, tree, workdir
from nanodo.configs import default
from nanodo.model import ModelConfig, TransformerDecoder
from nanodo.tree import PyTree

_NEEDS = "needs the safetensors package: pip install 'nanodo[hf-models]'"
# Tensors of some checkpoints that are no weights: causal masks, RoPE frequencies.
_BUFFERS = ('.attn.bias', '.attn.masked_bias', '.rotary_emb.inv_freq')


def _hf_shapes(cfg: ModelConfig, name: str) -> dict[str, tuple]:
  """The shape of every tensor of a model cfg of the family name (no weights made)."""
  abstract = tree.by_path(nnx.state(nnx.eval_shape(lambda: TransformerDecoder(cfg, nnx.Rngs(0)))))
  hf = jax.eval_shape(lambda p: hf_families.to_hf(cfg, name, p), abstract)
  return {k: tuple(v.shape) for k, v in hf.items()}


def _tokenizer_config(sp: spm.SentencePieceProcessor, L: int) -> dict:
  """tokenizer_config.json: the special pieces; those in a text are text, as in SentencePiece."""
  ids = {'bos': sp.bos_id(), 'eos': sp.eos_id(), 'unk': sp.unk_id(), 'pad': sp.pad_id()}
  pieces = {f'{k}_token': sp.id_to_piece(i) for k, i in ids.items() if i >= 0}
  return {'tokenizer_class': 'PreTrainedTokenizerFast', **pieces, 'model_max_length': L} | {
    'clean_up_tokenization_spaces': False,
    'split_special_tokens': True,
  }


def export(path: str, out: str, step: int | None = None) -> str:
  """Writes the run in path (a checkpoint; default: the latest) to out as a Hugging Face model.

  Returns the family. out must be absent or empty: it is written beside it, then renamed when
  whole, so that a failure leaves it as it was.
  """
  name = hf_families.family(workdir.run_config(path).model)
  if os.path.exists(out) and not (os.path.isdir(out) and not os.listdir(out)):
    raise ValueError(f'out={out!r} exists and is not empty; give a new or empty directory.')
  try:
    from safetensors.numpy import save_file
  except ImportError:
    raise ValueError(f'nanodo export {_NEEDS}') from None
  run = workdir.load(path, step)
  vocab, sp = workdir.tokenizer_path(run.config), run.sp
  config = hf_families.hf_config(run.cfg, name, sp)
  files = {
    'config.json': config,
    'generation_config.json': {k: v for k, v in config.items() if k.endswith('_token_id')},
    'tokenizer.json': tokenizer.hf_tokenizer(vocab),
    'tokenizer_config.json': _tokenizer_config(sp, run.cfg.L),
  }
  tensors = hf_families.to_hf(run.cfg, name, tree.by_path(jax.device_get(run.params)))
  # Contiguous: safetensors writes an array's memory as it lies, whatever its strides.
  tensors = {k: np.ascontiguousarray(v, np.float32) for k, v in tensors.items()}
  dest = os.path.abspath(out)
  tmp = os.path.join(os.path.dirname(dest), f'.{os.path.basename(dest)}.tmp-{os.getpid()}')
  shutil.rmtree(tmp, ignore_errors=True)
  os.makedirs(tmp)
  try:
    for file, content in files.items():
      with open(os.path.join(tmp, file), 'w', encoding='utf-8') as f:
        json.dump(content, f, indent=2, ensure_ascii=False)
    save_file(tensors, os.path.join(tmp, 'model.safetensors'), metadata={'format': 'pt'})
    shutil.copyfile(vocab, os.path.join(tmp, workdir.TOKENIZER))  # SentencePiece's own, for import
    os.replace(tmp, dest)  # replaces an empty directory
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return name


def _index(path: str, where: str, gpt2: bool) -> dict[str, tuple[str, str]]:
  """The file and stored name of each tensor in path, by the names to_hf gives."""
  try:
    from safetensors import safe_open
  except ImportError:
    raise ValueError(f'hf_init_dir {_NEEDS}') from None
  files = ['model.safetensors']
  if os.path.isfile(os.path.join(path, 'model.safetensors.index.json')):
    with open(os.path.join(path, 'model.safetensors.index.json'), encoding='utf-8') as f:
      files = sorted(set(json.load(f)['weight_map'].values()))
  elif not os.path.isfile(os.path.join(path, files[0])):
    no_pickle = 'nanodo reads weights from safetensors files only, never from pickles (.bin)'
    raise ValueError(f'{where} has no model.safetensors: {no_pickle}.')
  index = {}
  for file in files:
    try:
      with safe_open(os.path.join(path, file), framework='flax') as f:
        keys = list(f.keys())
    except Exception as e:  # safetensors' errors have no common base
      raise ValueError(f'{where}: {file} is unreadable ({e}).') from None
    for k in keys:  # GPT-2's own checkpoints leave out the prefix
      bare = gpt2 and not k.startswith(('transformer.', 'lm_head.'))
      index['transformer.' + k if bare else k] = (os.path.join(path, file), k)
  return index


def _read(index: dict[str, tuple[str, str]], names: list[str], values: bool) -> dict:
  """The shape, or with values the float32 value, of each named tensor."""
  from safetensors import safe_open

  out = {}
  for file in sorted({index[k][0] for k in names}):
    with safe_open(file, framework='flax') as f:
      for k in [k for k in names if index[k][0] == file]:
        stored = index[k][1]
        if values:
          out[k] = f.get_tensor(stored).astype(jnp.float32)
        else:
          out[k] = tuple(f.get_slice(stored).get_shape())
  return out


def _merged(c: ml_collections.ConfigDict, keys: dict, where: str) -> ml_collections.ConfigDict:
  """c with the model keys and vocab_size (V) of keys; ValueError where c sets another value."""
  d, keys, H = default.get_config(), dict(keys), keys['H']
  V = keys.pop('V')
  pairs = [(f'model.{k}', c.model[k], d.model[k], v) for k, v in keys.items()]
  for key, given, unset, value in [*pairs, ('vocab_size', c.vocab_size, d.vocab_size, V)]:
    agree = (given or H) == (value or H) if key == 'model.KV' else given == value
    if given != unset and not agree:
      held = f'{where} holds a model with {key}={value!r}'
      raise ValueError(f'{key}={given!r} is not valid: {held}; leave it out or set it so.')
  new = ml_collections.ConfigDict(c.to_dict())
  new.model.update({k: type(d.model[k])(v) for k, v in keys.items()})
  new.vocab_size = V
  return new


def _check_tensors(cfg: ModelConfig, name: str, path: str, where: str) -> None:
  """ValueError unless path holds the tensors of cfg, and GPT-2's biases are zeros."""
  expected, index = _hf_shapes(cfg, name), _index(path, where, name == 'gpt2')
  missing = [k for k in expected if k not in index]
  if missing:
    raise ValueError(f'{where} lacks {missing[0]}, which a {name} model of its config.json has.')
  for k, shape in _read(index, list(expected), values=False).items():
    if shape != expected[k]:
      sizes = f"its config.json's sizes make it {list(expected[k])}"
      raise ValueError(f'{where}: {k} is {list(shape)}; {sizes}.')
  tied_head = cfg.tied and 'lm_head.weight'
  extra = [k for k in index if k not in expected and not k.endswith(_BUFFERS) and k != tied_head]
  if extra:
    raise ValueError(f'{where} holds {extra[0]}, which has no place in a nanodo model.')
  biases = _read(index, [k for k in expected if k.endswith('.bias')], values=True)
  nonzero = [k for k, v in biases.items() if jnp.any(v != 0)]
  if nonzero:
    raise ValueError(f'{where}: {nonzero[0]} is not zero, and nanodo has no biases.')


def import_config(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """c with the model keys and vocab_size of the Hugging Face model in c.hf_init_dir, if any.

  A model key or vocab_size set away from its default must agree with that model; the others
  take its values. Its tokenizer and tensors are checked too: ValueError, before any work.
  """
  path, where = c.hf_init_dir, f'hf_init_dir={c.hf_init_dir!r}'
  if not path:
    return c
  if not os.path.isfile(os.path.join(path, 'config.json')):
    local = 'give a local Hugging Face model directory (nothing is downloaded)'
    raise ValueError(f'{where} has no config.json: {local}.')
  try:
    with open(os.path.join(path, 'config.json'), encoding='utf-8') as f:
      hf = json.load(f)
  except (OSError, ValueError) as e:
    raise ValueError(f'{where}: its config.json is unreadable ({e}).') from None
  try:
    name, keys = hf_families.model_keys(hf, where)
  except KeyError as e:
    raise ValueError(f'{where}: its config.json has no {e}, which nanodo needs.') from None
  new = _merged(c, keys, where)
  vocab = c.vocab_path or os.path.join(path, workdir.TOKENIZER)
  if not os.path.isfile(vocab):
    only = 'nanodo reads SentencePiece tokenizers only, or give vocab_path'
    raise ValueError(f'{where} has no {workdir.TOKENIZER}: {only}.')
  pieces = tokenizer.load(vocab).vocab_size()
  if pieces != new.vocab_size:
    held = f"its config.json's vocab_size={new.vocab_size}"
    raise ValueError(f'{where}: {held} differs from the {pieces} pieces of {vocab}.')
  _check_tensors(ModelConfig(V=new.vocab_size, **new.model), name, path, where)
  return new


def import_params(c: ml_collections.ConfigDict, params: PyTree) -> PyTree:
  """params (for their tree and dtypes) holding the weights of c.hf_init_dir.

  c is import_config's: its model keys are those of that directory's model.
  """
  cfg, name = ModelConfig(V=c.vocab_size, **c.model), hf_families.family(c.model)
  index = _index(c.hf_init_dir, f'hf_init_dir={c.hf_init_dir!r}', name == 'gpt2')
  tensors = _read(index, list(_hf_shapes(cfg, name)), values=True)
  shapes = {k: v.shape for k, v in tree.by_path(params).items()}
  flat = hf_families.from_hf(cfg, name, tensors, shapes)
  return jax.tree_util.tree_map_with_path(
    lambda p, x: flat[tree.path_str(p)].astype(x.dtype), params
  )
