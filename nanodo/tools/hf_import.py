"""`hf_init_dir`: a Hugging Face model directory (GPT-2, Llama, Qwen2, Qwen3) as a run's step 0."""

import dataclasses
import json
import os
import shutil

import jax
import ml_collections
import numpy as np

from nanodo.configs import default
from nanodo.corpora import tokenizer
from nanodo.ground import files, tree
from nanodo.ground.tree import PyTree
from nanodo.infra import workdir
from nanodo.model import ModelConfig
from nanodo.tools import hf_families, hf_tensors

# Tensors of some checkpoints that are no weights: causal masks, RoPE frequencies.
_BUFFERS = ('.attn.bias', '.attn.masked_bias', '.rotary_emb.inv_freq')


def _index(path: str, where: str, gpt2: bool) -> dict[str, tuple[str, str]]:
  """The file and stored name of each tensor in path, by the names to_hf gives."""
  try:
    from safetensors import safe_open
  except ImportError:
    raise ValueError(f'hf_init_dir {hf_families.NEEDS}') from None
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
      with safe_open(os.path.join(path, file), framework='numpy') as f:
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
    with safe_open(file, framework='numpy') as f:
      for k in [k for k in names if index[k][0] == file]:
        stored = index[k][1]
        if values:
          out[k] = f.get_tensor(stored).astype(np.float32)
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
  """ValueError unless path holds the tensors of cfg."""
  expected, index = hf_tensors.hf_shapes(cfg, name), _index(path, where, name == 'gpt2')
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


def _zero_biases(cfg: ModelConfig, path: str, where: str) -> bool:
  """Whether every bias of the GPT-2 in path is zero, as in nanodo's export of a run without."""
  biases = [k for k in hf_tensors.hf_shapes(cfg, 'gpt2') if k.endswith('.bias')]
  return not any(np.any(v != 0) for v in _read(_index(path, where, True), biases, True).values())


def config(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
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
  vocab = workdir.tokenizer_path(c.vocab_path, path)
  if vocab is None:
    names = f'{workdir.TOKENIZER} (SentencePiece) nor {workdir.TOKENIZER_JSON} (Hugging Face)'
    raise ValueError(f'{where} has neither {names}; give vocab_path.')
  pieces = tokenizer.load(vocab).vocab_size()
  if pieces > new.vocab_size:  # a larger one is padded, as Qwen3's and OLMo's are
    held = f"its config.json's vocab_size={new.vocab_size}"
    raise ValueError(f'{where}: {held} is smaller than the {pieces} tokens of {vocab}.')
  cfg = ModelConfig(V=new.vocab_size, **new.model)
  _check_tensors(cfg, name, path, where)
  if name == 'gpt2' and c.model.bias != 'all' and _zero_biases(cfg, path, where):
    new.model.bias = 'none'  # nanodo's export of a run without biases: no biases to train
  return new


def params(path: str, cfg: ModelConfig, like: PyTree) -> PyTree:
  """The weights of the Hugging Face model in path, as parameters of like's tree and dtypes.

  cfg is that model's: the run's, once config() gave it that model's keys.
  """
  name = hf_families.family(dataclasses.asdict(cfg))
  index = _index(path, f'hf_init_dir={path!r}', name == 'gpt2')
  tensors = _read(index, list(hf_tensors.hf_shapes(cfg, name)), values=True)
  shapes = {k: v.shape for k, v in tree.by_path(like).items()}
  flat = hf_tensors.from_hf(cfg, name, tensors, shapes)
  return jax.tree_util.tree_map_with_path(lambda p, x: flat[tree.path_str(p)].astype(x.dtype), like)


def keep_files(path: str, out: str) -> None:
  """Copies the files of the model in path but its weights (tokenizer, configs) to out."""
  weights = ('.safetensors', '.safetensors.index.json', '.bin', '.gguf', '.pt', '.pth')
  names = [n for n in sorted(os.listdir(path)) if not n.endswith(weights)]
  shutil.rmtree(out, ignore_errors=True)  # of a start that stopped before its first checkpoint
  with files.replaced(out) as tmp:
    os.makedirs(tmp)
    for name in [n for n in names if os.path.isfile(os.path.join(path, n))]:
      shutil.copyfile(os.path.join(path, name), os.path.join(tmp, name))


def start(
  path: str, cfg: ModelConfig, state: PyTree, shardings: PyTree, run: str
) -> tuple[PyTree, str]:
  """state with params(path) as its parameters, and the line that says so; the model's files
  but its weights are kept in the run's workdir (workdir.HF_FILES)."""
  if jax.process_index() == 0:
    keep_files(path, os.path.join(run, workdir.HF_FILES))
  weights = jax.device_put(params(path, cfg, state['params']), shardings['params'])
  # The optimizers' initial states hold zeros of the parameters' shapes, not their values.
  average = {'ema': weights} if 'ema' in state else {}  # the average starts from them too
  return {**state, 'params': weights, **average}, f'step 0 parameters: the weights of {path}'
