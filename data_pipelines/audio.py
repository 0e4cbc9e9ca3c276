"""Log-mel features for 16 kHz mono audio, their approximate inverse, and resampling.

Conventions (shared by the data pipeline, the audio autoencoder and the sync metric):

* STFT: periodic Hann window of ``n_fft`` samples, hop ``hop``, centred frames with zero
  padding of ``n_fft // 2`` on both sides, so frame ``i`` is centred on sample ``i * hop``
  (time ``i * hop / sample_rate``) and a wave of N samples gives ``1 + N // hop`` frames.
  With hop 160 at 16 kHz that is 100 frames per second.
* Magnitudes are scaled by ``2 / sum(window)`` so a full-scale sine has magnitude ~1.
* Mel: HTK mel scale, triangular filters with unit peak, ``n_mels`` bands over [fmin, fmax].
* Log: ``log(mel_power + LOG_EPS)`` in nats; silence sits at ``log(LOG_EPS)`` ~ -11.5.
"""

from __future__ import annotations

import functools
import math

import numpy as np
from scipy import signal

LOG_EPS = 1e-5


def _check_wave(wave) -> np.ndarray:
    wave = np.asarray(wave, dtype=np.float32)
    if wave.ndim != 1:
        raise ValueError(f"expected a mono waveform (N,), got shape {wave.shape}")
    return wave


def _hz_to_mel(f):
    return 2595.0 * np.log10(1.0 + np.asarray(f, np.float64) / 700.0)


def _mel_to_hz(m):
    return 700.0 * (10.0 ** (np.asarray(m, np.float64) / 2595.0) - 1.0)


@functools.lru_cache(maxsize=16)
def _mel_filterbank_cached(sample_rate, n_fft, n_mels, fmin, fmax) -> np.ndarray:
    freqs = np.linspace(0.0, sample_rate / 2, n_fft // 2 + 1)
    edges = _mel_to_hz(np.linspace(_hz_to_mel(fmin), _hz_to_mel(fmax), n_mels + 2))
    lower, centre, upper = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    up = (freqs - lower) / (centre - lower)
    down = (upper - freqs) / (upper - centre)
    fb = np.maximum(0.0, np.minimum(up, down)).astype(np.float32)
    fb.setflags(write=False)
    return fb


def mel_filterbank(
    sample_rate: int = 16000,
    n_fft: int = 512,
    n_mels: int = 64,
    fmin: float = 0.0,
    fmax: float | None = 8000.0,
) -> np.ndarray:
    """Triangular HTK-mel filters, float32 (n_mels, n_fft // 2 + 1), unit peak each.

    Raises:
        ValueError: when the band is empty or above Nyquist.
    """
    fmax = sample_rate / 2 if fmax is None else fmax
    if not 0 <= fmin < fmax <= sample_rate / 2:
        raise ValueError(
            f"need 0 <= fmin < fmax <= sample_rate/2, got fmin={fmin} fmax={fmax} sr={sample_rate}"
        )
    if n_mels < 1 or n_fft < 2:
        raise ValueError(f"need n_mels >= 1 and n_fft >= 2, got {n_mels}, {n_fft}")
    return _mel_filterbank_cached(
        int(sample_rate), int(n_fft), int(n_mels), float(fmin), float(fmax)
    )


@functools.lru_cache(maxsize=16)
def _mel_pinv(sample_rate, n_fft, n_mels, fmin, fmax) -> np.ndarray:
    """Pseudo-inverse of the mel basis, (n_fft // 2 + 1, n_mels); cached (an SVD each time)."""
    fb = mel_filterbank(sample_rate, n_fft, n_mels, fmin, fmax).astype(np.float64)
    inv = np.linalg.pinv(fb)
    inv.setflags(write=False)
    return inv


def _window(n_fft: int) -> np.ndarray:
    return signal.get_window("hann", n_fft, fftbins=True).astype(np.float32)


def stft(wave, n_fft: int = 512, hop: int = 160) -> np.ndarray:
    """Centred STFT, complex64 (frames, n_fft // 2 + 1), scaled so a unit sine peaks near 1."""
    wave = _check_wave(wave)
    win = _window(n_fft)
    padded = np.pad(wave, n_fft // 2)
    n_frames = 1 + len(wave) // hop
    idx = np.arange(n_frames)[:, None] * hop + np.arange(n_fft)[None, :]
    spec = np.fft.rfft(padded[idx] * win, axis=-1)
    return (spec * (2.0 / win.sum())).astype(np.complex64)


def istft(spec: np.ndarray, n_fft: int = 512, hop: int = 160, length: int | None = None):
    """Inverse of :func:`stft` by windowed overlap-add; float32 of ``length`` samples."""
    win = _window(n_fft).astype(np.float64)
    frames = np.fft.irfft(np.asarray(spec) / (2.0 / win.sum()), n=n_fft, axis=-1) * win
    n_frames = frames.shape[0]
    idx = (np.arange(n_frames)[:, None] * hop + np.arange(n_fft)[None, :]).ravel()
    total = n_fft + hop * (n_frames - 1)
    out = np.bincount(idx, weights=frames.ravel(), minlength=total)
    norm = np.bincount(idx, weights=np.tile(win**2, n_frames), minlength=total)
    out = (out / np.maximum(norm, 1e-8))[n_fft // 2 :]
    length = (n_frames - 1) * hop if length is None else length
    out = np.pad(out, (0, max(0, length - len(out))))[:length]
    return out.astype(np.float32)


def log_mel(
    wave,
    sample_rate: int = 16000,
    n_fft: int = 512,
    hop: int = 160,
    n_mels: int = 64,
    fmin: float = 0.0,
    fmax: float | None = 8000.0,
) -> np.ndarray:
    """Log-mel power spectrogram, float32 (1 + len(wave) // hop, n_mels); see module doc."""
    power = np.abs(stft(wave, n_fft, hop)) ** 2
    mel = power @ mel_filterbank(sample_rate, n_fft, n_mels, fmin, fmax).T
    return np.log(mel + LOG_EPS).astype(np.float32)


def log_mel_jax(
    wave,
    sample_rate: int = 16000,
    n_fft: int = 512,
    hop: int = 160,
    n_mels: int = 64,
    fmin: float = 0.0,
    fmax: float | None = 8000.0,
):
    """JAX twin of :func:`log_mel` for batches on an accelerator: (..., N) -> (..., frames, n_mels)."""
    import jax.numpy as jnp  # lazy: data workers that only need numpy never import jax

    wave = jnp.asarray(wave, jnp.float32)
    win = jnp.asarray(_window(n_fft))
    pad = [(0, 0)] * (wave.ndim - 1) + [(n_fft // 2, n_fft // 2)]
    padded = jnp.pad(wave, pad)
    n_frames = 1 + wave.shape[-1] // hop
    idx = np.arange(n_frames)[:, None] * hop + np.arange(n_fft)[None, :]
    spec = jnp.fft.rfft(padded[..., idx] * win, axis=-1) * (2.0 / float(_window(n_fft).sum()))
    power = jnp.real(spec) ** 2 + jnp.imag(spec) ** 2
    fb = jnp.asarray(mel_filterbank(sample_rate, n_fft, n_mels, fmin, fmax))
    return jnp.log(power @ fb.T + LOG_EPS)


def mel_to_wave(
    log_mel_spec: np.ndarray,
    sample_rate: int = 16000,
    n_fft: int = 512,
    hop: int = 160,
    fmin: float = 0.0,
    fmax: float | None = 8000.0,
    iters: int = 32,
    length: int | None = None,
    seed: int = 0,
) -> np.ndarray:
    """Approximate waveform from a log-mel spectrogram (fast Griffin-Lim).

    The linear magnitude comes from the pseudo-inverse of the mel basis (clipped at zero);
    the phase from ``iters`` Griffin-Lim iterations with momentum 0.99.

    Args:
        log_mel_spec: (frames, n_mels) as produced by :func:`log_mel`.
        sample_rate, n_fft, hop, fmin, fmax: Must match the forward transform.
        iters: Griffin-Lim iterations.
        length: Output samples; default ``(frames - 1) * hop``.
        seed: Seed of the initial random phase (the result is deterministic).

    Returns:
        float32 waveform.
    """
    lm = np.asarray(log_mel_spec, np.float64)
    if lm.ndim != 2:
        raise ValueError(f"expected log-mel (frames, n_mels), got shape {lm.shape}")
    inv = _mel_pinv(sample_rate, n_fft, lm.shape[1], fmin, fmax)
    mel_power = np.maximum(np.exp(lm) - LOG_EPS, 0.0)
    magnitude = np.sqrt(np.maximum(mel_power @ inv.T, 0.0))
    length = (lm.shape[0] - 1) * hop if length is None else length
    rng = np.random.default_rng(seed)
    angles = np.exp(2j * np.pi * rng.random(magnitude.shape))
    previous = np.zeros_like(angles)
    wave = istft(magnitude * angles, n_fft, hop, length)
    for _ in range(iters):
        rebuilt = stft(wave, n_fft, hop)[: magnitude.shape[0]].astype(np.complex128)
        rebuilt = np.pad(rebuilt, ((0, magnitude.shape[0] - rebuilt.shape[0]), (0, 0)))
        accelerated = rebuilt - 0.99 * previous
        previous = rebuilt
        angles = accelerated / np.maximum(np.abs(accelerated), 1e-12)
        wave = istft(magnitude * angles, n_fft, hop, length)
    return wave


def mels_to_waves(log_mels: np.ndarray, sample_rate: int = 16000, hop: int = 160) -> np.ndarray:
    """:func:`mel_to_wave` for each of a batch of log-mel spectrograms ``(N, Tm, n_mels)``;
    float32 ``(N, S)``."""
    return np.stack([mel_to_wave(m, sample_rate=sample_rate, hop=hop) for m in log_mels]).astype(
        np.float32
    )


def resample(wave, src_sr: int, dst_sr: int) -> np.ndarray:
    """Polyphase resampling of a mono waveform; float32, ``ceil(N * dst / src)`` samples."""
    wave = _check_wave(wave)
    if src_sr <= 0 or dst_sr <= 0:
        raise ValueError(f"sample rates must be positive, got {src_sr} -> {dst_sr}")
    if src_sr == dst_sr:
        return wave.copy()
    g = math.gcd(int(src_sr), int(dst_sr))
    return signal.resample_poly(wave, int(dst_sr) // g, int(src_sr) // g).astype(np.float32)
