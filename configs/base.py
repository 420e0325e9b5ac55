"""Every knob of mqa_flax, with its default: the paper's base model on WMT14.

Other config files start from `get_config()` here and change a few values.
Run: python train.py --config=configs/base.py --workdir=runs/base
"""

import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Returns the base configuration (Shazeer 2019, multi-head baseline)."""
  del arg
  c = ml_collections.ConfigDict()
  c.variant = 'mha'  # Attention variant name (configs/variants.py), for reports.
  c.seed = 0  # Parameter init, dropout and data order.
  # How attention over whole sequences computes (training, evaluation, the
  # encoder), never what: 'xla' (einsums; the [B, N, T, S] scores and their
  # gradients go through memory) or 'cudnn' (cuDNN's fused attention: a CUDA
  # GPU, model.dtype bfloat16 or float16; fewer kernels and bytes in the
  # compiled program, docs/perf.md). Not part of the architecture: a run may
  # resume with the other, and a run trained with 'cudnn' decodes anywhere.
  c.seq_attention_impl = 'xla'

  c.model = m = ml_collections.ConfigDict()
  m.num_encoder_layers = 6
  m.num_decoder_layers = 6
  m.d_model = 1024
  m.d_ff = 4096  # Hidden width of the ReLU feed-forward block.
  m.num_heads = 8  # N query heads.
  m.num_kv_heads = 8  # K key/value heads: N is MHA, 1 is MQA, between is GQA.
  m.head_dim = 128  # d_k = d_v.
  m.kv_heads_scope = 'all'  # 'all' (paper: enc self, dec self, cross) or 'decoder'.
  m.local_window = 0  # >0: decoder self-attention sees this many positions.
  m.max_len = 256  # Size of the positional embedding tables.
  m.pos_embedding = 'learned'  # 'learned' (paper) or 'sinusoidal'.
  m.dropout_rate = 0.1
  m.dtype = 'float32'  # Compute dtype; 'bfloat16' on accelerators.

  c.data = d = ml_collections.ConfigDict()
  d.source = 'tfds'  # 'numbers' (generated), 'text' (local files) or 'tfds'.
  d.data_dir = ''  # text: root of the split files; tfds: its data_dir.
  d.tfds_name = 'wmt14_translate/de-en'  # Or 'wmt_t2t_translate/de-en'.
  d.train_split = 'train'  # text: comma-separated paths under data_dir.
  d.dev_split = 'validation'  # Model selection and dev BLEU.
  d.test_split = 'test'  # Test BLEU.
  d.src_lang = 'en'
  d.tgt_lang = 'de'
  d.vocab_size = 32768  # Joint sentencepiece vocabulary.
  d.spm_max_sentences = 2_000_000  # Training sentences sampled for the vocab.
  d.max_len = 256  # Packed row length (tokens) for inputs and targets.
  d.max_eval_len = 256  # Longer dev/test sentences are truncated to this.
  d.batch_size = 128  # Packed rows per training step (global).
  d.eval_batch_size = 64  # Sentences per dev-loss and decoding batch.
  d.numbers_train_size = 20_000  # numbers: generated training pairs.
  d.numbers_eval_size = 500  # numbers: dev and test pairs each.
  d.numbers_max = 999_999  # numbers: largest number generated.
  d.prefetch = 2  # Batches prepared ahead on a host thread.

  c.opt = o = ml_collections.ConfigDict()
  o.optimizer = 'adafactor'  # 'adafactor' (paper's codebase) or 'adamw'.
  o.learning_rate = 0.01  # Peak, reached at the end of warmup.
  o.warmup_steps = 10_000  # Linear warmup, then the schedule's decay.
  o.warmup_fraction = 0.0  # >0: warmup is this fraction of the train steps.
  o.schedule = 'rsqrt'  # 'rsqrt' (decay as 1/sqrt(step)) or 'cosine' (to 0).
  o.b1 = 0.9  # adamw.
  o.b2 = 0.98  # adamw.
  o.weight_decay = 0.0  # adamw.
  o.grad_clip = 1.0  # Global-norm clipping; 0 disables.
  o.label_smoothing = 0.1

  c.num_train_steps = 100_000
  c.num_epochs = 0.0  # >0: train this many passes over the data (sets the steps).
  c.log_every = 100  # Train scalars and console progress.
  c.eval_every = 1000  # Dev loss / ln(PPL).
  c.bleu_every = 10_000  # Greedy dev BLEU; 0 disables.
  c.checkpoint_every = 2000
  c.keep_checkpoints = 3  # Latest train states; best-on-dev parameters go to best/.

  c.decode = dc = ml_collections.ConfigDict()
  dc.beam_size = 4
  dc.alpha = 0.6  # GNMT length penalty exponent.
  dc.max_len_a = 1.5  # Max output length = a * source length + b.
  dc.max_len_b = 10
  dc.overlong = 'truncate'  # Inputs over data.max_eval_len: 'truncate' or 'error'.
  # How a decode step computes (same results; compare with --mode=benchmark):
  # 'xla' (einsums), 'xla_reduce' (products and sums XLA fuses into one kernel
  # per attention: fewer kernels, awaits a GPU timing), 'cudnn' (GPU) or 'pallas'.
  dc.attention_impl = 'xla'
  # K/V cache arrays 'BKLH' [B, K, L, H] or 'BLKH' [B, L, K, H] ('cudnn' needs
  # BLKH). BKLH: fewer kernels and bytes per step in the compiled GPU program
  # (docs/perf.md, counted without a GPU); awaits a GPU timing to confirm.
  dc.cache_layout = 'BKLH'
  # Greedy decoding's next token and beam search's candidates: 'xla' (logits
  # written, then their argmax, or log-softmax and top-k) or 'pallas'
  # (mqa_flax.pallas_argmax: the argmax, or the top-k and log-normaliser,
  # inside the output GEMM, no logits written; interpreted, slowly, on a
  # CPU). Awaits a GPU timing.
  dc.argmax_impl = 'xla'
  # Beam search's self-attention cache: 'reorder' (after each step every
  # beam's K/V rows are gathered to where its beam went) or 'pointers' (K/V
  # stay in the slot that wrote them; a [beams, L] table of slots per
  # position is reordered instead, and each beam's self-attention reads all
  # of its sentence's slots, masked to its own history). Same results.
  dc.beam_cache = 'reorder'
  # Each decoder layer's LayerNorms in a decode step: 'xla' (a kernel writes
  # the normalised rows, the next GEMM reads them) or 'pallas'
  # (mqa_flax.pallas_norm_gemm: folded into the QKV, query and first
  # feed-forward GEMMs, which read the residual rows; interpreted, slowly, on
  # a CPU). Same results up to rounding. Awaits a GPU timing.
  dc.norm_impl = 'xla'
  return c
