"""The full set of config keys, with defaults. Every other config starts here.

Keys are fixed: ``--config.a.b=v`` may only override a key that exists below, which
is how vdiff catches typos (``train.trian`` -> "did you mean train.steps?").
"""

import ml_collections


def get_base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0

    # --- data: the built-in "shapes" dataset or an ingested ArrayRecord folder.
    c.data = d = ml_collections.ConfigDict()
    d.name = "shapes"  # "shapes" (generated into WORKDIR/data on first use) or "records"
    d.root = ""  # ArrayRecord folder for name="records"; default WORKDIR/data
    d.num_train = 2048  # shapes clips in the train split
    d.num_val = 128
    d.resolution = 32  # side of the rendered shapes clips (square)
    d.frames = 16  # frames of a rendered shapes clip (training shapes: data.buckets)
    d.fps = 8.0  # frame rate the frame stride aims at (each clip keeps its own, see buckets.py)
    d.max_shapes = 3  # shapes per clip (1..max_shapes)
    d.synth_workers = 2  # processes for synth and ingest
    d.audio = True
    d.sample_rate = 16000
    d.n_mels = 64
    d.hop = 160
    d.vocab_size = 512  # sentencepiece vocabulary
    # (height, width, frames) shapes a clip can train at; each clip goes to the bucket
    # nearest its aspect ratio, then the longest it can fill; frames=1 buckets take images.
    # Every bucket divides by vae.spatial_down x model.patch (height, width); the first is
    # what sampling, export and the report default to.
    d.buckets = ((32, 32, 16),)
    # Global transformer batch per bucket; () = keep a step's tokens near train.batch_size
    # clips of the first bucket (the autoencoder stages scale their batches the same way).
    d.bucket_batch = ()
    # Share of steps on image (frames=1) buckets; -1 = their share of the data.
    d.image_share = -1.0
    d.num_workers = 0  # grain worker processes (0 = in-process)
    d.prefetch = 2
    # How training reads clips: "cache" decodes every clip once at its bucket into a
    # decoded-frames cache (DATA_ROOT/frames, ArrayRecord; ~16 KB a shapes clip at 32x32x16) and
    # streams it; "stream" decodes the mp4 records in the grain workers at every step, with
    # a window drawn per epoch (no disk beyond the records: the path for large corpora).
    d.decode = "cache"
    # What the transformer stage trains from: "latents" reads the latent cache written once
    # (WORKDIR/latents, ArrayRecord shards; the fast default when the autoencoders are
    # fixed); "clips" encodes each batch of decoded clips with the frozen autoencoders
    # inside the train step (no per-clip cache, one encoder pass per step), same stats.
    d.dit_input = "latents"

    # --- video VAE (3D causal conv).
    c.vae = v = ml_collections.ConfigDict()
    v.spatial_down = 4
    v.temporal_down = 4
    v.latent_channels = 8
    # A narrow net, batch 8 and a higher lr: on a CPU budget more, cheaper updates beat
    # width (docs/experiments.md, "2026-11-21 — video VAE width against more updates").
    v.channels = 16  # width at H/2; 2x at H/4 and in the latent-rate trunk
    v.kl_weight = 1e-6
    v.steps = 3000
    v.batch_size = 8
    v.lr = 5e-3
    # Train on random square crops of this side (pixels; 0 = whole frames). The VAE is
    # fully convolutional, so it encodes whole frames after training on crops; a crop of
    # a quarter of the pixels makes each step several times cheaper.
    v.train_crop = 0
    # With train_crop: the last this-many steps train on whole frames (0 = crops to the
    # end). Crops learn the local code cheaply; the whole-frame steps fit the frame edges
    # and the full-frame latent statistics that the transformer then sees (on the tiny data
    # the transformer still fit such latents worse; docs/experiments.md,
    # "2026-11-22 — crop-then-whole-frame VAE").
    v.full_frame_steps = 0

    # --- audio autoencoder (1D conv over log-mel).
    c.audio_ae = a = ml_collections.ConfigDict()
    a.latent_channels = 8
    a.channels = 64
    a.time_down = 4
    a.kl_weight = 1e-6
    a.steps = 800
    a.batch_size = 16
    a.lr = 2e-3

    # --- diffusion transformer + text encoder.
    c.model = m = ml_collections.ConfigDict()
    m.width = 128
    m.depth = 4
    m.heads = 4
    m.mlp_ratio = 4.0
    m.patch = (1, 2, 2)  # (t, h, w) in latent units
    m.audio_patch = 1  # audio latent frames per token
    m.text_width = 128
    m.text_depth = 2
    m.text_heads = 4
    m.text_attention = "joint"  # "joint" (MMDiT-style) or "cross"
    m.qk_norm = True
    m.freeze_text = False  # the internal text encoder: no gradient into it, no update
    m.scan_layers = True
    # "auto": on a context mesh Ulysses (heads divide by the context) else ring; else cuDNN
    # on GPU, splash on TPU, blockwise once a head's logits pass 512 x 512, xla below. Or one of "xla",
    # "blockwise", "cudnn", "splash" (TPU), "ring", "ulysses", "ulysses_ring" (vdiff/models/attention.py).
    m.attention = "auto"
    m.cross_modal = (
        True  # False: no audio<->video attention (text tokens then attend to text only); ablation
    )
    m.rope_time_scale = 25.0  # temporal RoPE units per second (shared by video and audio tokens)
    m.rope_theta = 10000.0  # RoPE base period
    m.abs_pos = False  # add absolute (edge / clip-start) position features to video tokens

    # --- the caption encoder that steers every denoising step.
    c.text = x = ml_collections.ConfigDict()
    # "internal": a small encoder trained with the transformer (model.text_*) on a
    # sentencepiece vocabulary of the data's own captions (data.vocab_size). "t5": a
    # pretrained T5 v1.1 / mT5 / UMT5 encoder loaded from text.path, frozen; its caption
    # embeddings are computed once with the latent cache, so training never runs it.
    x.encoder = "internal"
    x.path = ""  # "t5": a Hugging Face folder (config.json, model.safetensors[.index.json], spiece.model)
    x.max_len = 32  # caption tokens after pad/truncate, end token included
    x.dtype = "bfloat16"  # "t5": its parameters and compute; cached embeddings are bfloat16
    x.batch_size = 64  # "t5": captions per encoder call (caching, prompts)

    # --- flow matching.
    c.diffusion = f = ml_collections.ConfigDict()
    f.t_mean = 0.0  # logit-normal location
    f.t_std = 1.0
    f.shift = 1.0  # timestep shift (>1 spends more steps at high noise)
    f.t_uniform = 0.0  # fraction of timesteps drawn uniform on (0, 1) instead (low noise too)
    f.caption_dropout = 0.1
    f.audio_loss_weight = 1.0
    f.p_clean_audio = 0.1  # audio -> video batches
    f.p_clean_video = 0.1  # video -> audio batches
    f.p_no_cross_modal = 0.1  # examples trained with audio<->video attention masked (ablation)

    # --- training (transformer stage; the AE stages have their own steps/lr above).
    c.train = t = ml_collections.ConfigDict()
    t.steps = 3000
    t.batch_size = 32
    t.lr = 1e-3
    t.warmup = 100
    t.weight_decay = 0.0
    # Transformer stage: "adamw", or "muon" (Muon on the hidden matrices, NAdamW for the rest).
    t.optimizer = "adamw"
    t.b2 = 0.99
    t.grad_clip = 1.0
    t.ema_decay = 0.999
    t.microbatches = 1
    # "none", "full", "save_dots", "save_dots_attention" (also keeps blockwise attention's
    # output: no attention rerun in the backward pass), "offload" (accelerators)
    t.remat = "none"
    t.param_dtype = "float32"
    t.compute_dtype = "float32"  # "bfloat16" on accelerators
    t.max_nonfinite = 5  # consecutive skipped steps before aborting
    t.log_every = 50
    t.ckpt_every = 500
    t.keep = 3  # last N checkpoints
    t.keep_every = 0  # and every K steps (0 = off)
    t.stages = ("vae", "audio_ae", "dit")  # what `vdiff train` runs, in order
    t.time_budget_s = 0.0  # stop a stage early at this wall time (0 = off)

    # --- sampling and the main job's report.
    c.sample = s = ml_collections.ConfigDict()
    s.sampler = "euler"  # "euler" or "heun"
    s.steps = 25
    s.cfg = 4.0
    s.audio_cfg = 2.0
    s.shift = 1.0
    s.seed = 0
    s.num_prompts = 32  # val prompts in the report
    s.renoise_t = (0.3, 0.6)  # report: denoise val clips re-noised to these t (diagnostic)
    s.use_ema = True

    # --- mesh: axis sizes (one may be -1 = fill) and logical -> mesh rules.
    c.mesh = ml_collections.ConfigDict()
    c.mesh.shape = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1, "context": 1})
    c.mesh.dcn_shape = ml_collections.ConfigDict({"data": 1, "fsdp": 1, "tensor": 1, "context": 1})
    c.mesh.rules = (
        ("batch", ("data", "fsdp")),
        ("tokens", "context"),
        ("embed", "fsdp"),
        ("heads", "tensor"),
        ("mlp", "tensor"),
        ("kv", None),
        ("vocab", "tensor"),
        ("conv_out", "tensor"),
    )
    return c
