"""Audio embeddings for an audio Frechet distance, behind one interface.

Every embedding declares ``name``, ``sample_rate`` (Hz, what it consumes) and ``dim``, and maps
one clip to ``[K, dim]`` float64 vectors with ``embed(wave, sample_rate)``; ``embed_many``
stacks the vectors of several clips, ready for :class:`sora.evaluation.frechet.FeatureStats`.
A clip is ``[N]`` or ``[C, N]`` (array or tensor, float, nominally in [-1, 1]); channels are
averaged to mono and the result is resampled to the embedding's rate with
``scipy.signal.resample_poly`` (polyphase FIR, Kaiser window beta=5, up/down = the rates
divided by their gcd), in float64. (The reference VGGish/PANNs pipelines resample with resampy
or librosa; the filters differ only near the Nyquist frequency of the lower rate.)

* ``fd_mel`` -- :class:`MelStatsEmbedding`: weight-free, offline. Not a learned embedding.
* ``vggish`` -- :class:`VGGishEmbedding` (torchvggish weights): one 128-d vector per 0.96 s,
  as in FAD (Kilgour et al. 2019).
* ``panns`` -- :class:`PANNsEmbedding` (Cnn14 weights): one 2048-d vector per clip.
* ``clap`` -- :class:`CLAPEmbedding` (a Hugging Face CLAP checkpoint directory).

Pretrained weights are read from a local path only; nothing is ever downloaded.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
import math
from pathlib import Path

import numpy as np
import torch

from sora.evaluation.audio_nets import VGGISH_RATE, Cnn14, VGGish, vggish_examples
from sora.models.mel import MelSpectrogram


def prepare_waveform(wave, sample_rate: int, target_rate: int) -> np.ndarray:
    """Clip ``[N]`` or ``[C, N]`` -> mono float64 ``[N']`` at ``target_rate`` (see module doc)."""
    if hasattr(wave, "detach"):
        wave = wave.detach().cpu().double().numpy()
    x = np.asarray(wave, dtype=np.float64)
    if x.ndim == 2:
        x = x.mean(0)
    if x.ndim != 1:
        raise ValueError(f"waveform has {x.ndim} dims (shape {x.shape}), expected [N] or [channels, N]")
    if x.size == 0 or not np.isfinite(x).all():
        raise ValueError(f"waveform is empty or contains NaN/inf (shape {x.shape})")
    if int(sample_rate) != int(target_rate):
        from scipy.signal import resample_poly

        g = math.gcd(int(sample_rate), int(target_rate))
        x = resample_poly(x, int(target_rate) // g, int(sample_rate) // g)
    return x


def load_weights(module: torch.nn.Module, path, nested_key: str | None = None) -> torch.nn.Module:
    """Load a local ``.safetensors`` or torch file (``weights_only=True``; numpy arrays are
    allowed, for training checkpoints that carry sampler states) into ``module``, strictly.
    With ``nested_key``, a dict holding it (e.g. ``{"model": state_dict, ...}``) is unwrapped.
    Missing, unexpected or mis-shaped keys raise one ``ValueError`` naming the file. ``module``
    may live on the meta device (no wasted random init): the file's tensors are assigned, cast
    to float32. Returns ``module``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such weights file (embeddings load local files only, never download)")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        with torch.serialization.safe_globals(_numpy_safe_globals()):
            try:  # memory-mapped where the file is a zip archive (torch >= 1.6), else read whole
                state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError:
                state = torch.load(path, map_location="cpu", weights_only=True)
    if nested_key and isinstance(state, dict) and isinstance(state.get(nested_key), dict):
        state = state[nested_key]
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected a state dict, found {type(state).__name__}")
    expected = module.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [f"{k} {tuple(state[k].shape)} != {tuple(v.shape)}" for k, v in expected.items()
              if k in state and tuple(state[k].shape) != tuple(v.shape)]
    problems = [f"{what} ({len(keys)}): {', '.join(keys[:4])}{', ...' if len(keys) > 4 else ''}"
                for what, keys in (("missing keys", missing), ("unexpected keys", unexpected),
                                   ("wrong shapes", shapes)) if keys]
    if problems:
        raise ValueError(f"{path}: weights do not fit {type(module).__name__}: {'; '.join(problems)}")
    module.load_state_dict(state, assign=True)
    return module.float()


def _numpy_safe_globals() -> list:
    """numpy array/scalar reconstruction: data only, safe for ``weights_only`` loading."""
    try:
        from numpy._core import multiarray
    except ImportError:  # numpy < 2
        from numpy.core import multiarray
    dtypes = [getattr(np.dtypes, n) for n in dir(np.dtypes) if n.endswith("DType")] if hasattr(np, "dtypes") else []
    return [np.ndarray, np.dtype, multiarray._reconstruct, multiarray.scalar, *dtypes]


class AudioEmbedding(ABC):
    """Base class: subclasses set ``name``, ``sample_rate``, ``dim`` and ``_embed``."""

    name: str
    sample_rate: int
    dim: int

    @abstractmethod
    def _embed(self, wave: np.ndarray) -> np.ndarray:
        """Mono float64 ``[N]`` at ``self.sample_rate`` -> ``[K, dim]``."""

    def embed(self, wave, sample_rate: int) -> np.ndarray:
        """One clip ``[N]`` / ``[C, N]`` at ``sample_rate`` -> float64 ``[K, dim]``."""
        out = self._embed(prepare_waveform(wave, sample_rate, self.sample_rate))
        return np.asarray(out, dtype=np.float64).reshape(-1, self.dim)

    def embed_many(self, waves, sample_rate: int) -> np.ndarray:
        """Several clips (a list, or a batch ``[B, N]`` / ``[B, C, N]``) -> stacked ``[sum K, dim]``."""
        return np.concatenate([self.embed(w, sample_rate) for w in waves] or [np.zeros((0, self.dim))])

    def __repr__(self):
        return f"{type(self).__name__}(name={self.name!r}, sample_rate={self.sample_rate}, dim={self.dim})"


class MelStatsEmbedding(AudioEmbedding):
    """``fd_mel``: statistics of a 64-band log-mel at 16 kHz, one 192-d vector per clip.

    Log-mel: :class:`sora.models.mel.MelSpectrogram` defaults (centred STFT, n_fft 1024,
    Hann, hop 160 = 100 frames/s, 64 Slaney mel bands 0-8 kHz, ``log(clamp(mel, 1e-5))`` of
    the magnitude), in float64. Vector: ``[mean_t(mel), std_t(mel), std_t(diff_t(mel))]``,
    each 64 bands ordered low to high (std with ddof=0; the last block is the spread of
    frame-to-frame changes, a crude measure of temporal texture). Weight-free and cheap: a
    sanity metric for sound, not a perceptual one; the Frechet distance on it is in nats^2.
    Clips need more than 512 samples at 16 kHz.
    """

    name, sample_rate, dim = "fd_mel", 16000, 192

    def __init__(self):
        self.mel = MelSpectrogram().double()

    def _embed(self, wave):
        if wave.size <= self.mel.n_fft // 2:
            raise ValueError(f"fd_mel: clip has {wave.size} samples at 16 kHz, need more than {self.mel.n_fft // 2}")
        with torch.no_grad():
            mel = self.mel(torch.from_numpy(wave)[None])[0].numpy()  # [64, frames]
        return np.concatenate([mel.mean(1), mel.std(1), np.diff(mel, axis=1).std(1)])[None]


class _TorchEmbedding(AudioEmbedding):
    """An embedding whose network runs in eval mode, float32, without gradients."""

    net: torch.nn.Module

    def _run(self, x: np.ndarray) -> np.ndarray:
        device = next(self.net.parameters()).device
        with torch.no_grad():
            return self.net(torch.as_tensor(x, dtype=torch.float32, device=device)).double().cpu().numpy()


class VGGishEmbedding(_TorchEmbedding):
    """``vggish``: torchvggish VGGish from ``vggish-10086976.pth`` (or a ``.safetensors`` with
    the same keys). Each 0.96 s of the clip (16 kHz, :func:`~sora.evaluation.audio_nets.vggish_examples`)
    gives one 128-d vector, pre-PCA (torchvggish ``postprocess=False``), as FAD pools them.
    Clips shorter than 0.975 s (one full example) raise an error."""

    name, sample_rate, dim = "vggish", VGGISH_RATE, 128

    def __init__(self, weights_path, device="cpu"):
        with torch.device("meta"):
            net = VGGish()
        self.net = load_weights(net, weights_path).eval().to(device)

    def _embed(self, wave):
        examples = vggish_examples(wave)
        if len(examples) == 0:
            raise ValueError(f"vggish: clip of {wave.size / VGGISH_RATE:.3f} s is shorter than one 0.975 s example")
        return self._run(examples[:, None])


class PANNsEmbedding(_TorchEmbedding):
    """``panns``: Cnn14 from ``Cnn14_mAP=0.431.pth`` (its ``"model"`` dict) or a ``.safetensors``
    state dict; one 2048-d vector per clip at 32 kHz (the whole clip, >= ~0.31 s)."""

    name, sample_rate, dim = "panns", 32000, 2048

    def __init__(self, weights_path, device="cpu"):
        with torch.device("meta"):
            net = Cnn14()
        self.net = load_weights(net, weights_path, nested_key="model").eval().to(device)

    def _embed(self, wave):
        if wave.size < 31 * 320:
            raise ValueError(f"panns: clip of {wave.size / 32000:.3f} s is too short for Cnn14 (>= 0.31 s)")
        return self._run(wave[None])


class CLAPEmbedding(AudioEmbedding):
    """``clap``: the audio tower of a Hugging Face CLAP checkpoint directory (model and
    ``preprocessor_config.json``, e.g. a local copy of ``laion/clap-htsat-unfused``), loaded with
    ``local_files_only=True``. Output: the L2-normalised projected audio embedding
    (``projection_dim``-d), one per window of at most ``max_length_s`` (10 s): a clip is cut
    into such consecutive windows and each is fed alone, so the extractor never crops at random
    (a window shorter than the maximum is repeat-padded by the extractor; a trailing window
    shorter than half the maximum is dropped unless it is the whole clip).
    For fusion models ``is_longer`` is set False (each window fits). Needs ``transformers``.
    """

    name = "clap"

    def __init__(self, model_dir, device="cpu"):
        try:
            from transformers import ClapFeatureExtractor, ClapModel
        except ImportError as err:
            raise ImportError("clap embedding needs transformers: pip install 'sora[text]' or transformers") from err
        model_dir = Path(model_dir)
        if not (model_dir / "config.json").is_file() or not (model_dir / "preprocessor_config.json").is_file():
            raise FileNotFoundError(f"{model_dir}: not a CLAP directory (needs config.json and preprocessor_config.json)")
        self.model = ClapModel.from_pretrained(str(model_dir), local_files_only=True).eval().to(device)
        self.extractor = ClapFeatureExtractor.from_pretrained(str(model_dir), local_files_only=True)
        self.sample_rate, self.dim = int(self.extractor.sampling_rate), int(self.model.config.projection_dim)
        self.fusion = bool(self.model.config.audio_config.enable_fusion)

    def _embed(self, wave):
        window = int(self.extractor.nb_max_samples)
        chunks = [wave[i : i + window] for i in range(0, wave.size, window)]
        if len(chunks) > 1 and chunks[-1].size < window // 2:
            chunks = chunks[:-1]  # a short tail would weigh as much as a full window
        return np.concatenate([self._embed_window(c) for c in chunks])

    def _embed_window(self, chunk):
        state = np.random.get_state()  # the extractor draws is_longer for fusion; keep global RNG untouched
        inputs = self.extractor(chunk, sampling_rate=self.sample_rate, return_tensors="pt",
                                truncation="fusion" if self.fusion else "rand_trunc")
        np.random.set_state(state)
        device = next(self.model.parameters()).device
        with torch.no_grad():
            out = self.model.get_audio_features(input_features=inputs["input_features"].float().to(device),
                                                is_longer=torch.zeros(1, 1, dtype=torch.bool, device=device))
        out = out if isinstance(out, torch.Tensor) else out.pooler_output  # transformers 4 / 5
        return out.double().cpu().numpy()


AUDIO_EMBEDDINGS = {"fd_mel": MelStatsEmbedding, "vggish": VGGishEmbedding, "panns": PANNsEmbedding,
                    "clap": CLAPEmbedding}


def audio_embedding(name: str, path=None, **kwargs) -> AudioEmbedding:
    """Build an embedding by name: ``fd_mel`` (no path), or ``vggish`` / ``panns`` (a local
    weights file) / ``clap`` (a local model directory). ``kwargs`` go to the class (``device``)."""
    if name not in AUDIO_EMBEDDINGS:
        raise ValueError(f"unknown audio embedding {name!r}; choose one of {sorted(AUDIO_EMBEDDINGS)}")
    if name == "fd_mel":
        if path is not None:
            raise ValueError("audio embedding 'fd_mel' is weight-free; it takes no path")
        return MelStatsEmbedding()
    if path is None:
        raise ValueError(f"audio embedding {name!r} needs path= to local weights (nothing is downloaded)")
    return AUDIO_EMBEDDINGS[name](path, **kwargs)
