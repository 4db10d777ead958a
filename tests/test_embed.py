"""Tests for memscan.embed: embeddings in record order, caching, encoder loading, and ``memscan embed``."""

from __future__ import annotations

import csv
import json

from pathlib import Path

import numpy as np
import pytest
import torch

from memscan.cli import main
from memscan.data import PreprocessConfig, load_image_set, preprocess_transforms
from memscan.embed import embed_images, load_encoder, save_embeddings
from memscan.errors import InputError
from memscan.networks import build_encoder

pytestmark = pytest.mark.usefixtures("one_torch_thread")



@pytest.fixture
def images(tiny_2d_folder):
    return load_image_set(tiny_2d_folder(n=5, size=(36, 40)), "images").records


@pytest.fixture
def encoder():
    torch.manual_seed(0)
    return build_encoder(2, "resnet10", embedding_dim=8).eval()


CFG = PreprocessConfig(spatial_dims=2, spatial_size=32)


def test_shapes_and_record_order(images, encoder):
    pre = preprocess_transforms(CFG)
    emb = embed_images(encoder, images, pre, batch_size=2, device="cpu")
    assert emb.shape == (5, 8) and emb.dtype == np.float32 and np.isfinite(emb).all()
    single = np.concatenate([embed_images(encoder, [r], pre, batch_size=1, device="cpu") for r in images])
    np.testing.assert_allclose(emb, single, rtol=1e-4, atol=1e-5)  # batching does not change rows (eval mode)
    reversed_emb = embed_images(encoder, images[::-1], pre, batch_size=3, device="cpu")
    np.testing.assert_allclose(reversed_emb, emb[::-1], rtol=1e-4, atol=1e-5)
    assert not np.allclose(emb[0], emb[1])  # distinct images, distinct embeddings


def test_cache_reuses_unchanged_images(images, encoder, tmp_path):
    first = embed_images(encoder, images, CFG, cache_dir=tmp_path / "c", device="cpu", checkpoint_sha256="abc")
    assert len(list((tmp_path / "c").glob("*.npy"))) == 5

    class Broken(torch.nn.Module):
        def forward(self, x):
            raise AssertionError("the cache should have answered")

    again = embed_images(Broken(), images, CFG, cache_dir=tmp_path / "c", device="cpu", checkpoint_sha256="abc")
    np.testing.assert_array_equal(first, again)
    other = embed_images(encoder, images[:2], CFG, cache_dir=tmp_path / "c", device="cpu", checkpoint_sha256="new")
    np.testing.assert_allclose(other, first[:2], rtol=1e-4, atol=1e-5)  # different weights id: recomputed
    assert len(list((tmp_path / "c").glob("*.npy"))) == 7


def test_cache_follows_file_content_not_path(images, encoder, tmp_path):
    import shutil

    first = embed_images(encoder, images, CFG, cache_dir=tmp_path / "c", device="cpu", checkpoint_sha256="abc")
    moved = []
    for i, record in enumerate(images):  # the same bytes under new names in another folder
        target = tmp_path / "moved" / f"renamed_{i}{Path(record['image']).suffix}"
        target.parent.mkdir(exist_ok=True)
        shutil.copy(record["image"], target)
        moved.append({**record, "image": str(target)})

    class Broken(torch.nn.Module):
        def forward(self, x):
            raise AssertionError("the cache should have answered")

    np.testing.assert_array_equal(
        embed_images(Broken(), moved, CFG, cache_dir=tmp_path / "c", device="cpu", checkpoint_sha256="abc"), first)
    shutil.copy(images[1]["image"], moved[0]["image"])  # edited content: embedded again, not served stale
    again = embed_images(encoder, moved[:1], CFG, cache_dir=tmp_path / "c", device="cpu", checkpoint_sha256="abc")
    np.testing.assert_allclose(again[0], first[1], rtol=1e-4, atol=1e-5)


def test_bad_arguments(images, encoder):
    with pytest.raises(InputError):
        embed_images(encoder, images, CFG, batch_size=0)
    with pytest.raises(InputError):
        embed_images(encoder, [{"path": "x"}], CFG)
    with pytest.raises(InputError, match="device"):
        embed_images(encoder, images, CFG, device="cuda:7" if not torch.cuda.is_available() else "nonsense")


def test_save_embeddings_writes_array_and_file_list(tmp_path):
    path = save_embeddings(np.eye(3, dtype=np.float32), tmp_path / "x.npy", files=["a", "b", "c"])
    np.testing.assert_array_equal(np.load(path), np.eye(3))
    rows = list(csv.reader(open(tmp_path / "x.files.csv")))
    assert rows == [["index", "image"], ["0", "a"], ["1", "b"], ["2", "c"]]
    with pytest.raises(InputError):
        save_embeddings(np.eye(3), tmp_path / "y.npy", files=["a"])


def test_load_encoder_recognises_checkpoint_and_reads_sidecar(tmp_path, encoder):
    path = tmp_path / "model.pt"
    torch.save(encoder.state_dict(), path)
    net, cfg = load_encoder(path, image_size=32)
    assert cfg.spatial_dims == 2 and cfg.size == (32, 32)
    torch.testing.assert_close(net.state_dict()["net.fc.weight"], encoder.state_dict()["net.fc.weight"])
    (tmp_path / "encoder.json").write_text(json.dumps({"spatial_dims": 2, "arch": "resnet10", "embedding_dim": 8,
                                                       "image_size": [48, 48], "resize": True, "crop_pad_size": None}))
    _, cfg2 = load_encoder(path)
    assert cfg2.size == (48, 48)


def test_cli_embed_end_to_end(tmp_path, tiny_2d_folder, encoder, capsys):
    folder = tiny_2d_folder(n=3)
    ckpt = tmp_path / "model.pt"
    torch.save(encoder.state_dict(), ckpt)
    out = tmp_path / "emb" / "x.npy"
    code = main(["embed", "--checkpoint", str(ckpt), "--images", str(folder), "--out", str(out),
                 "--image-size", "32", "--device", "cpu", "--precision", "float32", "--num-workers", "1"])
    assert code == 0 and "(float32 forward pass)" in capsys.readouterr().out
    emb = np.load(out)
    assert emb.shape == (3, 8)
    listing = list(csv.DictReader(open(tmp_path / "emb" / "x.files.csv")))
    assert [r["image"] for r in listing] == [r["image"] for r in load_image_set(folder, "s").records]
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    capsys.readouterr()
    code = main(["embed", "--checkpoint", str(bad), "--images", str(folder), "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "bad.pt" in err[0]


def test_precision_resolution():
    from memscan.embed import resolve_precision

    native = bool(getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)())
    assert resolve_precision("auto", "cpu") == ("bfloat16" if native else "float32")
    assert resolve_precision(None, "cpu") == resolve_precision("auto", "cpu")
    assert resolve_precision("bf16", "cpu") == "bfloat16" and resolve_precision("float32", "cpu") == "float32"
    with pytest.raises(InputError, match="precision"):
        resolve_precision("float16", "cpu")
    with pytest.raises(InputError, match="precision"):
        resolve_precision("int8", "cpu")
    with pytest.raises(InputError, match="precision"):
        embed_images(build_encoder(2, "resnet10", 4), [{"image": "x.png"}], CFG, device="cpu", precision="half")


def test_bfloat16_agrees_with_float32_and_has_its_own_cache(images, encoder, tmp_path):
    fp32 = embed_images(encoder, images, CFG, device="cpu", precision="float32", batch_size=5)
    legacy = embed_images(encoder, images, CFG, device="cpu", amp=False, batch_size=5)
    np.testing.assert_array_equal(fp32, legacy)  # amp=False is float32
    bf16 = embed_images(encoder, images, CFG, device="cpu", precision="bfloat16", batch_size=2,
                        cache_dir=tmp_path / "c", checkpoint_sha256="w")
    assert bf16.dtype == np.float32 and bf16.shape == fp32.shape
    a, b = fp32 - fp32.mean(1, keepdims=True), bf16 - bf16.mean(1, keepdims=True)
    r = (a * b).sum(1) / np.sqrt((a * a).sum(1) * (b * b).sum(1))
    assert r.min() > 0.99, r  # bfloat16 keeps 8 mantissa bits: close, not equal
    assert not np.array_equal(fp32, bf16)  # it really ran in bfloat16
    # the precision is part of the cache key: float32 is not served the bfloat16 rows
    again = embed_images(encoder, images, CFG, device="cpu", precision="float32", batch_size=5,
                         cache_dir=tmp_path / "c", checkpoint_sha256="w")
    np.testing.assert_allclose(again, fp32, rtol=1e-4, atol=1e-5)
    assert len(list((tmp_path / "c").glob("*.npy"))) == 2 * len(images)


def test_non_finite_low_precision_batch_is_recomputed_in_float32(images, encoder):
    class OverflowsInBf16(torch.nn.Module):
        def __init__(self, net):
            super().__init__()
            self.net = net

        def forward(self, x):
            out = self.net(x)
            return out * float("inf") if torch.is_autocast_enabled(x.device.type) else out

    guarded = embed_images(OverflowsInBf16(encoder), images, CFG, device="cpu", precision="bfloat16")
    np.testing.assert_allclose(guarded, embed_images(encoder, images, CFG, device="cpu", precision="float32"),
                               rtol=1e-4, atol=1e-5)


def test_preprocessing_change_changes_the_cache_key(images, encoder, tmp_path):
    calls = []

    class Counting(torch.nn.Module):
        def __init__(self, net):
            super().__init__()
            self.net = net

        def forward(self, x):
            calls.append(len(x))
            return self.net(x)

    net = Counting(encoder)
    embed_images(net, images, CFG, cache_dir=tmp_path / "c", device="cpu", checkpoint_sha256="w", batch_size=8)
    embed_images(net, images, preprocess_transforms(CFG), cache_dir=tmp_path / "c", device="cpu",
                 checkpoint_sha256="w", batch_size=8)
    assert calls == [5]  # the config and the chain built from it share one key
    embed_images(net, images, PreprocessConfig(spatial_dims=2, spatial_size=32, output_range=(-1.0, 1.0)),
                 cache_dir=tmp_path / "c", device="cpu", checkpoint_sha256="w", batch_size=8)
    assert calls == [5, 5]  # another intensity range: embedded again


def test_loader_transform_runs_plain_tensors_without_changing_values(images, tiny_3d_folder):
    """The embedding loader runs the steps after loading/orientation/spacing with MONAI's track_meta off (faster,
    plain tensors): same values as the chain itself, and the process-wide flag is restored, also after an error."""
    from monai.data import get_track_meta

    from memscan.embed import _LoaderTransform

    records_3d = load_image_set(tiny_3d_folder(n=1), "v").records
    for cfg, record in ((CFG, images[0]),
                        (PreprocessConfig(spatial_dims=3, spatial_size=8, pixdim=(2.0, 2.0, 2.0)), records_3d[0])):
        chain = preprocess_transforms(cfg)
        loader = _LoaderTransform(chain, single_thread=True)
        assert loader.tail is not None
        out = loader(dict(record))["image"]
        assert type(out) is torch.Tensor and get_track_meta()
        torch.testing.assert_close(out, chain(dict(record))["image"].as_tensor())
    from monai.transforms import Compose, Lambdad

    def fail(x):
        assert not get_track_meta()  # the tail runs without metadata tracking
        raise ValueError("boom")

    failing = _LoaderTransform(Compose([preprocess_transforms(CFG), Lambdad("image", fail)]), single_thread=True)
    with pytest.raises(Exception) as info:  # MONAI wraps the error in a RuntimeError
        failing(dict(images[0]))
    causes = [info.value]
    while causes[-1].__cause__ is not None:
        causes.append(causes[-1].__cause__)
    assert any("boom" in str(c) for c in causes)
    assert get_track_meta()  # restored after the failure


def test_inferer_folds_batch_norm_without_touching_the_network() -> None:
    """The inferer runs a batch-norm-folded copy: same outputs, the network unchanged, remade after a weight
    update in place (an optimizer step between evaluations)."""
    from memscan.embed import EmbeddingInferer

    torch.manual_seed(0)
    net = build_encoder(2, "resnet10", 8)
    with torch.no_grad():  # non-trivial running statistics, so folding changes the weights
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
    net.eval()
    x = torch.randn(3, 1, 32, 32)
    inferer = EmbeddingInferer("float32")
    with torch.inference_mode():
        expected = net(x)
        got = inferer(x, net)
    np.testing.assert_allclose(got.numpy(), expected.numpy(), rtol=1e-4, atol=1e-5)
    from memscan.embed import _INFERENCE_COPIES

    folded = _INFERENCE_COPIES[net][("cpu", torch.float32, 4, True)][1]
    assert folded is not net
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in net.modules())
    with torch.no_grad():
        next(net.parameters()).mul_(2.0)  # in place, like an optimizer step
    with torch.inference_mode():
        np.testing.assert_allclose(inferer(x, net).numpy(), net(x).numpy(), rtol=1e-4, atol=1e-5)
    assert _INFERENCE_COPIES[net][("cpu", torch.float32, 4, True)][1] is not folded
    assert EmbeddingInferer("float32")._inference_network(net, torch.device("cpu"), torch.float32, 4) is \
        _INFERENCE_COPIES[net][("cpu", torch.float32, 4, True)][1]  # shared by inferers while the weights stay


@pytest.mark.parametrize("dims", [2, 3])
def test_cpu_float32_runs_channels_last_with_its_own_cache_key(dims, images, encoder) -> None:
    """On the CPU, float32 embedding runs the folded copy channels-last (oneDNN's faster layout): same values as the
    plain network, the network itself untouched, and cache entries apart from other layouts'."""
    from memscan import embed
    from memscan.embed import EmbeddingInferer

    torch.manual_seed(1)
    net = build_encoder(dims, "resnet10", 8).eval()
    x = torch.randn(2, 1, *([16] * dims))
    fmt = torch.channels_last if dims == 2 else torch.channels_last_3d
    with torch.inference_mode():
        expected = net(x)
        got = EmbeddingInferer("float32")(x, net)
    np.testing.assert_allclose(got.numpy(), expected.numpy(), rtol=1e-4, atol=1e-5)
    copy = embed._INFERENCE_COPIES[net][("cpu", torch.float32, dims + 2, True)][1]
    conv = next(m for m in copy.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Conv3d))
                and m.in_channels > 1 and max(m.kernel_size) > 1)  # other weights are both layouts at once
    assert conv.weight.is_contiguous(memory_format=fmt)
    assert next(net.parameters()).is_contiguous()  # the caller's network keeps its layout
    if dims == 2:
        from memscan.data import preprocess_transforms

        tf = [preprocess_transforms(CFG)]
        cpu = embed._cache_keys(images, encoder, tf, torch.device("cpu"), "float32", None)
        gpu = embed._cache_keys(images, encoder, tf, torch.device("cuda"), "float32", None)
        assert cpu[0][0] != gpu[0][0]


def test_loader_thread_leaves_the_callers_thread_count(images, encoder, monkeypatch) -> None:
    """The CPU loader preprocesses in a background thread on one intra-op thread, which also lowers torch's
    process-wide default; a caller thread that had not used its thread count yet must keep the count it had when
    it called, not pick up the loader's 1."""
    import threading

    from memscan import embed

    real_call = embed._LoaderTransform.__call__

    def stays_single_threaded(self, data):  # the loader thread caught inside its one-thread block
        out = real_call(self, data)
        torch.set_num_threads(1)
        return out

    monkeypatch.setattr(embed._LoaderTransform, "__call__", stays_single_threaded)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    seen: list[int] = []
    try:
        def caller() -> None:  # a fresh thread: its intra-op count is not initialised yet
            embed_images(encoder, images, PreprocessConfig(spatial_dims=2, spatial_size=16), batch_size=2,
                         device="cpu", num_workers=0)
            seen.append(torch.get_num_threads())

        worker = threading.Thread(target=caller)
        worker.start()
        worker.join()
    finally:
        torch.set_num_threads(before)
    assert seen == [2]


def test_unreadable_image_raises_through_the_prefetch_thread(images, encoder, tmp_path) -> None:
    """A file that fails while the background thread preprocesses it raises in the caller (naming the file), as
    without the thread — never a short or repeated set of embeddings."""
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not a png")
    records = [*images[:3], {"image": str(bad)}, *images[3:]]
    with pytest.raises(Exception) as info:
        embed_images(encoder, records, CFG, batch_size=2, device="cpu", num_workers=0)
    chain, err = [], info.value
    while err is not None:
        chain.append(str(err))
        err = err.__cause__ or err.__context__
    assert any("broken.png" in text for text in chain), chain


def test_inference_copies_are_shared_and_die_with_their_network() -> None:
    """Inferers share a network's inference copy (an audit embeds several sets with one network, folding and fusing
    it once), keyed by precision; the cache holds no reference that keeps a dropped network alive."""
    import gc
    import weakref

    from memscan.embed import _INFERENCE_COPIES, EmbeddingInferer

    net = build_encoder(2, "resnet10", 8).eval()
    x = torch.rand(2, 1, 32, 32)
    with torch.inference_mode():
        EmbeddingInferer("float32")(x, net)
        first = _INFERENCE_COPIES[net][("cpu", torch.float32, 4, True)][1]
        EmbeddingInferer("float32")(x, net)
        assert _INFERENCE_COPIES[net][("cpu", torch.float32, 4, True)][1] is first
    plain = build_encoder(2, "resnet10", 8)
    for m in list(plain.modules()):  # no batch norm to fold: the network itself runs, and must stay collectable
        for name, child in list(m.named_children()):
            if isinstance(child, torch.nn.BatchNorm2d):
                setattr(m, name, torch.nn.Identity())
    plain.eval()
    with torch.inference_mode():
        EmbeddingInferer("float32")(x, plain)
    refs = [weakref.ref(net), weakref.ref(plain)]
    del net, plain, first
    gc.collect()
    assert all(r() is None for r in refs)


@pytest.mark.parametrize("precision", ["float32", "auto"])
def test_embed_mirrored_equals_separate_passes_and_shares_their_cache(images, encoder, tmp_path, monkeypatch,
                                                                      precision) -> None:
    """One decoding per file gives what three passes gave (the embeddings of each image and its mirror image, both
    images' coarse pixels), under the same cache keys; with everything cached only the pixels are recomputed."""
    from monai.transforms import Compose, Flipd

    from memscan import embed as embed_module
    from memscan.embed import embed_mirrored, preprocess_batch
    from memscan.scoring import pixel_features

    pre = preprocess_transforms(CFG)
    cache = tmp_path / "cache"
    feats = embed_mirrored(encoder, images, pre, pixel_sizes=[(8, 8), (16, 16)], plain_pixel_sizes=[(12, 12)],
                           batch_size=2, device="cpu", cache_dir=cache, precision=precision)
    plain = embed_images(encoder, images, pre, batch_size=3, device="cpu", precision=precision)
    flipped = embed_images(encoder, images, Compose([pre, Flipd(keys="image", spatial_axis=0)]), batch_size=3,
                           device="cpu", precision=precision)
    tol = {"rtol": 1e-4, "atol": 1e-5} if precision == "float32" else {"rtol": 2e-2, "atol": 2e-2}
    np.testing.assert_allclose(feats.embedding, plain, **tol)
    np.testing.assert_allclose(feats.mirrored, flipped, **tol)
    assert not np.allclose(feats.embedding, feats.mirrored)
    batch = preprocess_batch(pre, images)
    for (pix, mirror), size in zip(feats.pixels, [(8, 8), (16, 16)]):
        np.testing.assert_allclose(pix, pixel_features(batch, size), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(mirror, pixel_features(np.flip(batch, axis=2), size), rtol=1e-5, atol=1e-6)
    assert len(feats.plain_pixels) == 1  # the image's pixels only: no mirror image is kept for a plain size
    np.testing.assert_allclose(feats.plain_pixels[0], pixel_features(batch, (12, 12)), rtol=1e-5, atol=1e-6)
    assert len(list(cache.glob("*.npy"))) == 2 * len(images)  # plain and mirrored embeddings, never pixels
    cached_plain = embed_images(encoder, images, pre, batch_size=3, device="cpu", cache_dir=cache,
                                precision=precision)
    np.testing.assert_array_equal(cached_plain, feats.embedding)  # embed_images reads the same entries
    assert len(list(cache.glob("*.npy"))) == 2 * len(images)

    def no_network(*args, **kwargs):
        raise AssertionError("every embedding was cached: no network pass expected")

    monkeypatch.setattr(embed_module, "_evaluate", no_network)
    again = embed_mirrored(encoder, images, pre, pixel_sizes=[(8, 8), (16, 16)], plain_pixel_sizes=[(12, 12)],
                           batch_size=2, device="cpu", cache_dir=cache, precision=precision)
    np.testing.assert_array_equal(again.embedding, feats.embedding)
    np.testing.assert_array_equal(again.mirrored, feats.mirrored)
    for (a, b), (c, d) in zip(again.pixels, feats.pixels):
        np.testing.assert_allclose(a, c, rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(b, d, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(again.plain_pixels[0], feats.plain_pixels[0], rtol=1e-6, atol=1e-7)
