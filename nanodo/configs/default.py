"""Default config: a real model on the built-in Shakespeare corpus, sized for a 2-core CPU."""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  """Every key the code reads, with its default."""
  c = ml_collections.ConfigDict()
  c.seed = 42
  c.workdir = ''
  # Data source (README, "Data"): 'shakespeare' or 'pystdlib' (built in, with fixed held-out
  # splits); 'text', 'jsonl', 'parquet' or 'arrayrecord' (local files: the splits are globs);
  # 'tfds:NAME[:VERSION]' or 'hf:PATH' (optional extras: the splits are split names).
  c.ds_name = 'shakespeare'
  c.train_split = 'train'
  c.eval_split = 'test'
  # JSON Lines, Parquet, TFDS and Hugging Face records: the field that holds a document's text.
  c.text_field = 'text'
  # Plain text files: one document per 'file', or per blank-line separated 'paragraph'.
  c.text_documents = 'file'
  # A file or record that is not UTF-8: 'error' stops naming it; 'skip' skips and counts it.
  c.bad_utf8 = 'error'
  # TFDS's data_dir; empty: TFDS's default.
  c.tfds_data_dir = ''
  # Token ids are cached here, per source split and tokenizer; empty: <workdir>/token_cache.
  c.cache_dir = ''
  # Processes that tokenize while a cache is built. 1: this one, with a thread per core; more
  # pay off on corpora of tens of MB and up (each worker first imports the program).
  c.tokenize_workers = 1
  # 'packed': document pieces packed into rows, no attention across documents; 'concat': the
  # original's concatenate-and-split (rows cross documents).
  c.packing = 'packed'
  # A SentencePiece model; empty: train one with vocab_size pieces into the workdir.
  c.vocab_path = ''
  c.vocab_size = 8192
  # Global batch of one optimizer step, over every device and process.
  c.batch_size = 16
  c.eval_batch_size = 16
  # Micro-batches per step: batch_size rows as grad_accumulation_steps passes of fewer rows,
  # summed inside one jitted step (less activation memory, same update).
  c.grad_accumulation_steps = 1

  c.model = ml_collections.ConfigDict()
  c.model.D = 128
  c.model.H = 2
  c.model.L = 128
  c.model.N = 4
  c.model.F = 512
  c.model.dtype = 'float32'  # 'bfloat16' on accelerators.
  c.model.remat = False
  # What a remat'ed block keeps for the backward pass: a jax.checkpoint_policies name.
  c.model.remat_policy = 'nothing_saveable'
  # Options beyond the original; the defaults are the original's architecture.
  c.model.positions = 'learned'  # 'learned' | 'rope' | 'none'
  c.model.rope_base = 10_000.0
  # '': plain RoPE; 'llama3:factor,low_freq_factor,high_freq_factor,original_L': Llama 3.1's
  # longer wavelengths, e.g. 'llama3:32,1,4,8192' (Llama 3.2).
  c.model.rope_scaling = ''
  c.model.norm = 'layernorm'  # 'layernorm' (no bias) | 'rmsnorm'
  c.model.norm_eps = 1e-6  # added to the variance (mean square) in every norm
  c.model.mlp = 'gelu'  # 'gelu' | 'swiglu' | 'relu2' (squared ReLU)
  c.model.qk_norm = False  # normalise queries and keys per head
  c.model.KV = 0  # key/value heads, dividing H (1: multi-query); 0: H (multi-head)
  c.model.K = 0  # head dimension; 0: D // H
  # Biases, zero-initialised: 'none'; 'qkv' on the query, key and value projections (Qwen2);
  # 'all' on every projection but the output head, and on LayerNorm (GPT-2).
  c.model.bias = 'none'
  c.model.tied = True  # output projection shares the input embedding
  c.model.attention = 'einsum'  # 'einsum' | 'dot_product_attention' (cuDNN on GPUs)
  c.model.zero_init = False  # attention's and the MLP's output projections start at zero
  # The untied head (model.tied=False) starts at zero: every width's first logits are 0 (µP's
  # readout, Tensor Programs V).
  c.model.zero_head = False
  c.model.logit_softcap = 0.0  # logits as c·tanh(logits / c); 0: uncapped
  # How initial scales, multipliers, learning rates and Adam's epsilon change with model.D: 'sp'
  # (standard, as is) | 'mup' | 'ntk' | 'mfp' (mean-field), Everett et al. 2024's for Adam, each
  # equal to sp at model.D == model.base_width (ops.EXPONENTS); ntk needs model.tied=False.
  c.model.parameterization = 'sp'
  c.model.base_width = 0  # the width they equal sp at; needed by all but sp

  # Training loss extras, off by default; logged apart from the plain cross-entropy 'loss'.
  c.label_smoothing = 0.0
  c.z_loss = 0.0  # weight of the squared log-normalizer
  # Tokens whose logits exist at once in the training loss (over all devices); see
  # nanodo/cross_entropy.py.
  c.cross_entropy_block_size = 512

  # A wall-clock budget in minutes from launch (0: none). The run times its first steps, then
  # trains the steps that end, with its evaluations, within it: opt.num_train_steps is replaced by
  # that count, which workdir/budget.json keeps for a resumed run (README, "A time budget").
  c.train_minutes = 0.0
  # A sweep (README, "Sweeps"): 'key=v1,v2 key=v1,v2' trains the product of the value lists, in
  # groups that share a program (stacked: one vmapped step for all), and writes report.json.
  c.sweep = ''
  # Variants of a group its step computes at once (jax.vmap), the others one after another in
  # the same program: less memory at once. 0: all of them.
  c.sweep_vmap = 0

  c.opt = ml_collections.ConfigDict()
  # 'adamw' | 'adam_atan2' (Adam with atan2 for the division, no eps) | 'lion' | 'adafactor' |
  # 'muon' (+ AdamW off matrices)
  c.opt.optimizer = 'adamw'
  c.opt.num_train_steps = 1100
  c.opt.peak_learning_rate = 5e-3
  c.opt.init_learning_rate = 0.0
  c.opt.final_learning_rate = 3e-4
  c.opt.warmup_steps = 60
  c.opt.decay_type = 'cosine'
  c.opt.weight_decay = 0.1
  c.opt.b1 = 0.9
  c.opt.b2 = 0.95
  c.opt.eps = 1e-8
  c.opt.clip_by_global_norm = 1.0
  # Weight decay applies to matrices (never to norm scales) whose path does not match this
  # regular expression; paths look like 'blocks/0/attn/wq_DxHxK', 'embed_VxD'.
  c.opt.weight_decay_exclude = 'embed_|pos_'
  # Per-parameter learning-rate multipliers: 'regex=multiplier,...', first match wins.
  c.opt.lr_multipliers = ''
  # decay_type 'wsd': the fraction of the post-warmup steps spent decaying.
  c.opt.wsd_decay_fraction = 0.2
  # An exponential moving average of the weights, evaluated in their place: its decay per step
  # (0: none, the weights as trained).
  c.opt.ema_decay = 0.0

  # Device mesh: 'data' replicates the state (data parallel), 'fsdp' shards parameters and
  # optimizer state; batches are split over both. -1: the devices the other axis leaves.
  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = 1
  c.mesh.fsdp = -1

  # Several processes (one per host, or per GPU) join through jax.distributed when
  # coordinator_address is set or a cluster launcher's environment says so (SLURM, Open MPI,
  # multi-host Cloud TPU, JAX_COORDINATOR_ADDRESS). Unset values come from that environment.
  c.distributed = ml_collections.ConfigDict()
  c.distributed.coordinator_address = ''  # host:port of process 0
  c.distributed.num_processes = 0  # 0: from the environment
  c.distributed.process_id = -1  # -1: from the environment
  c.distributed.initialization_timeout = 300  # seconds to wait for every process
  # Seconds a joined process may stop answering before JAX stops the others (README, "A lost
  # process"); too short, and a run whose host is only busy is stopped.
  c.distributed.heartbeat_timeout = 100

  # Peak TFLOP/s of all devices together, for the MFU in the logs; 0: the datasheet figure of
  # known GPUs and TPUs for model.dtype (nanodo/peaks.py), else a matmul timed at start-up.
  c.peak_tflops = 0.0
  # Every step's metrics go to workdir/metrics.jsonl and TensorBoard; the console shows a bar on
  # a terminal, else a line every log_every_steps (TensorBoard's events are flushed as often).
  c.log_every_steps = 10
  # rms, mean and std of every layer's output, gradient, parameter and update (divided by the
  # learning rate), logged every step; off: the step computes none of them.
  c.log_internal_metrics = False
  # Each layer's largest attention logit, the output logits' largest value and mean, and the mean
  # squared log-normalizer (what z_loss penalises), logged every step under stability/.
  c.log_stability_metrics = False
  # Trace this many steps (after the first, which compiles) with jax.profiler into the workdir
  # (TensorBoard's profile tab opens it); 0: no trace.
  c.profile_steps = 0
  # A Weights & Biases project to log to as well (needs `pip install 'nanodo[wandb]'`); '': none.
  c.wandb_project = ''
  c.wandb_entity = ''  # '': the W&B default entity.
  c.eval_every_steps = 500
  c.eval_at_start = False  # also before the first step: a fine-tune's baseline (hf_init_dir)
  c.checkpoint_every_steps = 200
  c.max_to_keep = 3
  # Restore the latest checkpoint of this directory when the workdir has none.
  c.checkpoint_restore_dir = ''
  # A local Hugging Face model directory (GPT-2, Llama or Qwen3, safetensors weights) whose weights
  # are the step-0 parameters, when the workdir has no checkpoint; its config.json gives the model
  # keys, its tokenizer.model the tokenizer (README, "Using a trained model elsewhere").
  c.hf_init_dir = ''
  return c
