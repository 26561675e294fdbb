"""Audio embeddings: fd_mel known answers, the VGGish / Cnn14 / CLAP adapters loading random weights
saved in their release formats, and the registry."""

import numpy as np
import pytest
import torch
from scipy.signal import butter, resample_poly, sosfilt

from sora.evaluation.audio_features import (CLAPEmbedding, MelStatsEmbedding, PANNsEmbedding, VGGishEmbedding,
                                            audio_embedding, prepare_waveform)
from sora.evaluation.audio_nets import Cnn14, VGGish, _LogmelFilterBank, _Spectrogram, vggish_examples, vggish_log_mel
from sora.evaluation.frechet import frechet_distance


def sine(freq, seconds, rate, amp=0.5):
    return amp * np.sin(2 * np.pi * freq * np.arange(int(seconds * rate)) / rate)


def slaney_mel(f):  # Slaney / librosa htk=False, written out independently
    f = np.asarray(f, np.float64)
    return np.where(f < 1000, f * 3 / 200, 15 + 27 * np.log(np.maximum(f, 1e-9) / 1000) / np.log(6.4))


def test_prepare_waveform_mono_and_polyphase_resampling():
    stereo = np.stack([sine(440, 0.5, 44100), sine(440, 0.5, 44100, amp=0.1)])
    out = prepare_waveform(torch.from_numpy(stereo).float(), 44100, 16000)
    expected = sine(440, 0.5, 16000, amp=0.3)  # channel mean, then the same tone at 16 kHz
    assert out.shape == (8000,) and out.dtype == np.float64
    np.testing.assert_allclose(out[200:-200], expected[200:-200], atol=2e-3)  # edges: filter transients
    with pytest.raises(ValueError, match=r"waveform has 3 dims"):
        prepare_waveform(np.zeros((1, 2, 100)), 16000, 16000)


def test_fd_mel_tone_lands_in_its_band():
    emb = MelStatsEmbedding()
    vec = emb.embed(sine(1000, 1.0, 16000), 16000)
    assert vec.shape == (1, 192) and emb.dim == 192 and emb.name == "fd_mel"
    centres = np.linspace(slaney_mel(0), slaney_mel(8000), 66)[1:-1]  # mel-spaced band centres
    assert vec[0, :64].argmax() == np.abs(centres - slaney_mel(1000)).argmin()
    assert vec[0, 64 + vec[0, :64].argmax()] < 0.1  # a steady tone: its band's level hardly moves


def test_fd_mel_distances_separate_sounds_not_sample_rates():
    emb = MelStatsEmbedding()
    lowpass = butter(4, 3000, fs=16000, output="sos")
    noise = lambda seed: sosfilt(lowpass, 0.2 * np.random.default_rng(seed).standard_normal(8000))  # noqa: E731
    decays = [sine(300 + 300 * s, 0.5, 16000) * np.exp(-6 * np.arange(8000) / 16000) for s in range(8)]
    ref = emb.embed_many([noise(s) for s in range(8)], 16000)
    upsampled = emb.embed_many([resample_poly(noise(s), 3, 1) for s in range(8)], 48000)  # same clips, 48 kHz
    fresh = emb.embed_many([noise(s + 100) for s in range(8)], 16000)  # new draws of the same process
    tones = emb.embed_many(decays, 16000)
    d_resampled, d_fresh, d_tones = (frechet_distance(ref, x) for x in (upsampled, fresh, tones))
    assert d_resampled < 0.25 * d_fresh and d_fresh < 0.01 * d_tones


def test_vggish_framing_matches_mel_features_transcription():
    rng = np.random.default_rng(0)
    wave = rng.uniform(-1, 1, 16000 + 123)
    # Google's mel_features.py, written out as loops: HTK mel, 125-7500 Hz, DC row zeroed
    hz_mel = lambda f: 1127.0 * np.log(1.0 + f / 700.0)  # noqa: E731
    bins = hz_mel(np.linspace(0, 8000, 257))
    edges = np.linspace(hz_mel(125.0), hz_mel(7500.0), 66)
    weights = np.empty((257, 64))
    for i in range(64):
        lo, mid, hi = edges[i : i + 3]
        weights[:, i] = np.maximum(0.0, np.minimum((bins - lo) / (mid - lo), (hi - bins) / (hi - mid)))
    weights[0] = 0.0
    n_frames = 1 + (wave.size - 400) // 160
    window = np.hanning(401)[:-1]  # periodic Hann
    expected = np.stack([np.log(np.abs(np.fft.rfft(wave[i * 160 : i * 160 + 400] * window, 512)) @ weights + 0.01)
                         for i in range(n_frames)])
    np.testing.assert_allclose(vggish_log_mel(wave), expected, rtol=1e-10, atol=1e-10)
    examples = vggish_examples(np.concatenate([wave, wave]))
    assert examples.shape == ((1 + (2 * wave.size - 400) // 160) // 96, 96, 64)
    centres = edges[1:-1]
    assert vggish_log_mel(sine(1000, 1.0, 16000)).mean(0).argmax() == np.abs(centres - hz_mel(1000)).argmin()


@pytest.fixture(scope="module")
def vggish_file(tmp_path_factory):
    torch.manual_seed(0)
    net = VGGish().eval()
    path = tmp_path_factory.mktemp("vggish") / "vggish-10086976.pth"
    torch.save(net.state_dict(), path)  # torchvggish's release is a plain state dict
    yield net, path
    path.unlink()


def test_vggish_adapter_loads_release_format(vggish_file):
    net, path = vggish_file
    emb = audio_embedding("vggish", path)
    assert isinstance(emb, VGGishEmbedding) and (emb.name, emb.sample_rate, emb.dim) == ("vggish", 16000, 128)
    wave = 0.3 * np.random.default_rng(1).standard_normal(2 * 44100)  # 2 s at 44.1 kHz -> two 0.96 s examples
    out = emb.embed(wave, 44100)
    examples = vggish_examples(prepare_waveform(wave, 44100, 16000))
    with torch.no_grad():
        expected = net(torch.from_numpy(examples[:, None]).float()).double().numpy()
    assert out.shape == (2, 128)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(emb.embed(wave, 44100), out)
    with pytest.raises(ValueError, match="shorter than one 0.975 s example"):
        emb.embed(wave[:20000], 44100)


def test_weights_mismatch_names_file_and_keys(tmp_path):
    bad = {"features.0.weight": torch.zeros(64, 1, 3, 3), "classifier.weight": torch.zeros(2)}
    path = tmp_path / "wrong.pth"
    torch.save(bad, path)
    with pytest.raises(ValueError, match=r"wrong\.pth: weights do not fit VGGish: missing keys \(17\): "
                                         r"features\.0\.bias.*unexpected keys \(1\): classifier\.weight"):
        VGGishEmbedding(path)
    bad["features.0.weight"] = torch.zeros(32, 1, 3, 3)
    from safetensors.torch import save_file

    save_file(bad, str(tmp_path / "wrong.safetensors"))
    with pytest.raises(ValueError, match=r"wrong shapes \(1\): features\.0\.weight \(32, 1, 3, 3\) != \(64, 1, 3, 3\)"):
        VGGishEmbedding(tmp_path / "wrong.safetensors")
    with pytest.raises(FileNotFoundError, match="never download"):
        VGGishEmbedding(tmp_path / "absent.pth")


def test_cnn14_front_end_is_a_power_stft_and_slaney_mel():
    spectrogram, logmel = _Spectrogram(1024, 320), _LogmelFilterBank(32000, 1024, 64, 50.0, 14000.0)  # Cnn14's
    wave = torch.randn(2, 8000, dtype=torch.float64)
    spec = spectrogram.double()(wave)[:, 0]  # [B, frames, bins], DFT weights rounded to float32
    ref = torch.stft(wave, 1024, 320, window=torch.hann_window(1024, dtype=torch.float64), center=True,
                     pad_mode="reflect", return_complex=True).abs().pow(2).transpose(1, 2)
    torch.testing.assert_close(spec, ref, rtol=1e-5, atol=1e-3)
    mel_w = logmel.melW.double().numpy()  # [513, 64]
    peaks = np.linspace(0, 16000, 513)[mel_w.argmax(0)]  # each triangle peaks at its mel-spaced centre
    centres = np.linspace(slaney_mel(50), slaney_mel(14000), 66)[1:-1]
    np.testing.assert_allclose(slaney_mel(peaks), centres, atol=0.5)  # within one FFT bin (< 0.5 mel here)


def test_panns_adapter_loads_training_checkpoint(tmp_path):
    torch.manual_seed(1)
    net = Cnn14().eval()
    path = tmp_path / "Cnn14_mAP=0.431.pth"
    # the release holds the state dict under "model", beside training state with numpy arrays
    torch.save({"iteration": 3, "model": net.state_dict(),
                "sampler": {"random_state": np.random.RandomState(0).get_state()}}, path)
    emb = audio_embedding("panns", path)
    path.unlink()
    assert isinstance(emb, PANNsEmbedding) and (emb.sample_rate, emb.dim) == (32000, 2048)
    wave = 0.3 * np.random.default_rng(2).standard_normal(8000)  # 0.5 s
    out = emb.embed(wave, 16000)
    with torch.no_grad():
        expected = net(torch.from_numpy(prepare_waveform(wave, 16000, 32000))[None].float()).double().numpy()
    assert out.shape == (1, 2048) and (out >= 0).all()
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(emb.embed(wave, 16000), out)


@pytest.mark.parametrize("fusion", [False, True])
def test_clap_adapter_from_local_directory(tmp_path, fusion):
    transformers = pytest.importorskip("transformers")
    config = transformers.ClapConfig(
        text_config=dict(vocab_size=100, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=32, max_position_embeddings=40),
        audio_config=dict(hidden_size=32, patch_embeds_hidden_size=16, depths=[1, 1], num_attention_heads=[1, 2],
                          window_size=4, spec_size=64, patch_size=4, num_mel_bins=16, enable_fusion=fusion),
        projection_dim=8)
    torch.manual_seed(2)
    model = transformers.ClapModel(config).eval()
    extractor = transformers.ClapFeatureExtractor(feature_size=16, sampling_rate=8000, hop_length=80,
                                                  max_length_s=1, fft_window_size=512,
                                                  frequency_max=4000)
    model.save_pretrained(tmp_path)
    extractor.save_pretrained(tmp_path)
    emb = audio_embedding("clap", tmp_path)
    assert isinstance(emb, CLAPEmbedding) and (emb.sample_rate, emb.dim) == (8000, 8)
    wave = 0.3 * np.random.default_rng(3).standard_normal(16000 * 2 + 1000)  # 2.06 s -> two 1 s windows
    np.random.seed(0)
    out = emb.embed(wave, 16000)
    assert np.random.randint(1 << 30) == np.random.RandomState(0).randint(1 << 30)  # global RNG untouched
    assert out.shape == (2, 8)
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, rtol=1e-5)
    first = prepare_waveform(wave, 16000, 8000)[:8000]
    inputs = extractor(first, sampling_rate=8000, return_tensors="pt", truncation="fusion" if fusion else "rand_trunc")
    with torch.no_grad():
        ref = model.get_audio_features(input_features=inputs["input_features"].float(),
                                       is_longer=torch.zeros(1, 1, dtype=torch.bool))
    ref = ref if isinstance(ref, torch.Tensor) else ref.pooler_output
    np.testing.assert_allclose(out[0], ref[0].double().numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(emb.embed(wave, 16000), out)


def test_registry_errors():
    assert isinstance(audio_embedding("fd_mel"), MelStatsEmbedding)
    with pytest.raises(ValueError, match=r"unknown audio embedding 'fad'; choose one of \['clap', 'fd_mel'"):
        audio_embedding("fad")
    with pytest.raises(ValueError, match="'vggish' needs path="):
        audio_embedding("vggish")
    with pytest.raises(ValueError, match="takes no path"):
        audio_embedding("fd_mel", "x.pth")
    with pytest.raises(FileNotFoundError, match="not a CLAP directory"):
        pytest.importorskip("transformers") and audio_embedding("clap", "/nonexistent")
