"""``memscan embed``: embeddings of a set of images with a trained encoder."""

from __future__ import annotations

import argparse
from typing import Any

__all__ = ["add_parser", "run"]


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``memscan embed`` on the top-level subparsers."""
    parser = subparsers.add_parser(
        "embed",
        help="embed images with a trained encoder (.npy + file list)",
        description="Embed every image of a folder or manifest with an encoder checkpoint. Writes OUT (.npy, one "
        "float32 row per image) and OUT minus .npy plus .files.csv (the image of each row). Encoder settings come "
        "from encoder.json beside the checkpoint, else are recognised from the weights; flags override.",
    )
    parser.add_argument("--checkpoint", required=True, metavar="C", help="encoder weights (plain state_dict)")
    parser.add_argument("--images", required=True, metavar="DIR", help="images: folder or CSV manifest")
    parser.add_argument("--out", required=True, metavar="X.npy", help="output embeddings")
    parser.add_argument("--dims", type=int, choices=(2, 3), default=None, help="2D or 3D (default: from checkpoint)")
    parser.add_argument("--arch", default=None, help="encoder architecture (default: from checkpoint)")
    parser.add_argument("--image-size", type=int, nargs="+", default=None, metavar="N",
                        help="input size the encoder was trained with (default: encoder.json or the paper's)")
    parser.add_argument("--batch-size", type=int, default=16, help="images per forward pass (default 16)")
    parser.add_argument("--device", default="auto", help="auto (GPU if present), cpu, cuda, cuda:N")
    parser.add_argument("--precision", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
                        help="arithmetic of the forward pass: auto (default) = float16 autocast on CUDA, bfloat16 on a "
                        "CPU with native bfloat16 (AMX / AVX-512 BF16), else float32; embeddings are float32")
    parser.add_argument("--num-workers", type=int, default=None, metavar="N",
                        help="data-loading processes (default: 2 on GPU, 0 on CPU)")
    parser.add_argument("--cache-dir", default=None, metavar="DIR", help="reuse embeddings of unchanged images")
    parser.add_argument("--layout", default="auto", choices=("auto", "folder", "manifest", "nih", "mrnet"),
                        help="layout of --images (default: detect)")
    parser.set_defaults(run=run)
    return parser


def run(args: argparse.Namespace) -> int:
    """Load the encoder, embed the images in order, write the .npy and its file list."""
    from memscan.data import load_image_set, preprocess_transforms
    from memscan.embed import embed_images, file_sha256, load_encoder, resolve_precision, save_embeddings

    image_size = None
    if args.image_size is not None:
        image_size = args.image_size[0] if len(args.image_size) == 1 else list(args.image_size)
    network, cfg = load_encoder(args.checkpoint, spatial_dims=args.dims, arch=args.arch, image_size=image_size)
    precision = resolve_precision(args.precision, args.device)
    images = load_image_set(args.images, "images", layout=args.layout, spatial_dims=cfg.spatial_dims)
    emb = embed_images(
        network,
        images.records,
        preprocess_transforms(cfg),
        batch_size=args.batch_size,
        device=args.device,
        cache_dir=args.cache_dir,
        checkpoint_sha256=file_sha256(args.checkpoint) if args.cache_dir else None,
        num_workers=args.num_workers,
        precision=precision,
        progress=True,
    )
    path = save_embeddings(emb, args.out, files=[r["image"] for r in images.records])
    print(f"{path}: {emb.shape[0]} embeddings of size {emb.shape[1]} ({precision} forward pass)")
    return 0
