"""`ember image`: build the guest kernel and test initramfs, and say where they are.

``ember image build`` is idempotent and cheap when nothing changed, so scripts
and CI can run it unconditionally before booting; ``ember image path NAME``
prints one absolute path for use in shell (``--kernel "$(ember image path
kernel)"``) and fails with a hint when the artifact is not built.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from ember import images
from ember.cli import int_at_least
from ember.images.kernel_build import default_jobs


def register(subparsers: argparse._SubParsersAction[Any]) -> None:
    """Add ``image build`` and ``image path`` to the ``ember`` parser."""
    parser = subparsers.add_parser(
        "image",
        help="build or locate the guest kernel and initramfs",
        description="Build the guest kernel and test initramfs once; they are cached under "
        "$EMBER_CACHE_DIR (default ~/.cache/ember) by a hash of their inputs.",
    )
    sub = parser.add_subparsers(dest="image_command", metavar="ACTION", required=True)

    build = sub.add_parser(
        "build",
        help="build whatever is not cached yet",
        description="Build the guest kernel (several minutes) and test initramfs (a second), "
        "or report that they are cached.",
    )
    build.add_argument(
        "--kernel-only", action="store_true", help="skip the initramfs and root file system"
    )
    build.add_argument("--force", action="store_true", help="rebuild even if cached")
    build.add_argument(
        "--jobs",
        "-j",
        type=int_at_least(1),
        default=None,
        metavar="N",
        help=f"parallel make jobs (default: the CPU count, {default_jobs()} here)",
    )
    build.set_defaults(func=_build)

    path = sub.add_parser(
        "path",
        help="print the path of a built artifact",
        description="Print the absolute path of a cached artifact for the current inputs; "
        "fail if it is not built.",
    )
    path.add_argument(
        "artifact",
        choices=images.ARTIFACTS,
        help="kernel: ELF vmlinux; bzimage: compressed kernel; initrd: ember-init cpio; "
        "rootfs: ext4 root file system",
    )
    path.set_defaults(func=_path)

    prune = sub.add_parser(
        "prune",
        help="delete cached images and default templates nothing current uses",
        description="Delete what earlier versions of the guest images left in the cache: "
        "kernels, initramfs, root file systems and layers of other inputs, and default "
        "templates of other images. Named templates and what they use are kept.",
    )
    prune.add_argument("--dry-run", action="store_true", help="list, delete nothing")
    prune.set_defaults(func=_prune)


def _build(args: argparse.Namespace) -> int:
    paths = images.build_all(
        kernel=True,
        initramfs=not args.kernel_only,
        root=not args.kernel_only,
        force=args.force,
        jobs=args.jobs,
    )
    for name in images.ARTIFACTS:
        if name in paths:
            print(f"{name:8} {paths[name]}")
    sys.stdout.flush()
    return 0


def _path(args: argparse.Namespace) -> int:
    print(images.artifact_path(args.artifact))
    return 0


def _prune(args: argparse.Namespace) -> int:
    from ember.prune import prune

    entries = prune(dry_run=args.dry_run)
    verb = "would remove" if args.dry_run else "removed"
    for entry in entries:
        print(f"{verb} {entry.kind:<12} {entry.size / (1 << 20):8.1f} MiB  {entry.path}")
    total = sum(entry.size for entry in entries)
    print(f"{verb} {len(entries)} entries, {total / (1 << 20):.1f} MiB")
    return 0
