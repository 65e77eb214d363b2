#!/usr/bin/env bash
# Apply megatron-sed's patch to a Megatron-LM checkout so that pretrain_gpt.py accepts
# --loss-type sed and the --sed-* flags.
#
#   scripts/apply_megatron_patch.sh [--check] [--patch FILE] MEGATRON_LM_DIR
#
# The patch is chosen from the tree's release: its git tag (core_vX.Y.Z) when the
# checkout sits on one, else megatron/core/package_info.py's MAJOR.MINOR. The tree is
# checked with `git apply --check` first; a tree the patch does not fit (another
# release, local edits to pretrain_gpt.py) is refused and left untouched. Running it
# again on a patched tree is a no-op. --check only reports. Exit status: 0 applied or
# already applied (or would apply, with --check), 1 refused, 2 usage.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
patch_dir="$here/patches/megatron-lm"
check_only=0
patch_file=""
why="--patch"
while [ $# -gt 0 ]; do
  case "$1" in
    --check) check_only=1; shift ;;
    --patch) patch_file="${2:?--patch needs a file}"; shift 2 ;;
    -h|--help) sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    -*) echo "apply_megatron_patch: unknown option $1" >&2; exit 2 ;;
    *) break ;;
  esac
done
if [ $# -ne 1 ]; then
  echo "usage: $0 [--check] [--patch FILE] MEGATRON_LM_DIR" >&2
  exit 2
fi
mlm="$(cd "$1" 2>/dev/null && pwd)" || { echo "apply_megatron_patch: no such directory: $1" >&2; exit 1; }
if [ ! -f "$mlm/pretrain_gpt.py" ] || [ ! -f "$mlm/megatron/core/package_info.py" ]; then
  echo "apply_megatron_patch: $mlm is not a Megatron-LM checkout (no pretrain_gpt.py or megatron/core/package_info.py)" >&2
  exit 1
fi
supported="$(cd "$patch_dir" && ls core_v*.patch | sed 's/\.patch$//' | tr '\n' ' ')"

if [ -n "$patch_file" ]; then
  [ -f "$patch_file" ] || { echo "apply_megatron_patch: no such patch: $patch_file" >&2; exit 1; }
  patch_file="$(realpath "$patch_file")"
else
  tag="$(git -C "$mlm" describe --tags --exact-match 2>/dev/null || true)"
  if [ -n "$tag" ] && [ -f "$patch_dir/$tag.patch" ]; then
    patch_file="$patch_dir/$tag.patch"
    why="git tag $tag"
  elif [ -n "$tag" ]; then
    echo "apply_megatron_patch: $mlm is at tag $tag; megatron-sed has patches for: $supported" >&2
    echo "  check out one of those tags, or pass --patch FILE to try one at your own risk" >&2
    exit 1
  else
    ver="$(sed -n 's/^\(MAJOR\|MINOR\) = \([0-9]*\).*/\2/p' "$mlm/megatron/core/package_info.py" | paste -sd.)"
    match="$(cd "$patch_dir" && ls "core_v$ver".*.patch 2>/dev/null | sort -V | tail -1 || true)"
    if [ -z "$match" ]; then
      echo "apply_megatron_patch: $mlm is Megatron-Core $ver (no release tag); megatron-sed has patches for: $supported" >&2
      exit 1
    fi
    patch_file="$patch_dir/$match"
    why="megatron/core/package_info.py version $ver (not on a release tag)"
  fi
fi
[ -f "$patch_file" ] || { echo "apply_megatron_patch: no such patch: $patch_file" >&2; exit 1; }
name="$(basename "$patch_file")"

# `git apply` works on plain directories too (no repository needed).
if (cd "$mlm" && git apply --reverse --check "$patch_file") >/dev/null 2>&1; then
  echo "apply_megatron_patch: $name is already applied to $mlm: nothing to do"
  exit 0
fi
if ! err="$(cd "$mlm" && git apply --check "$patch_file" 2>&1)"; then
  echo "apply_megatron_patch: refusing: $name (chosen from $why) does not apply to $mlm:" >&2
  echo "$err" | sed 's/^/  /' >&2
  echo "  the tree differs from the release the patch was made for (local edits to pretrain_gpt.py?)." >&2
  echo "  megatron-sed has patches for: $supported" >&2
  exit 1
fi
if [ "$check_only" = 1 ]; then
  echo "apply_megatron_patch: $name applies cleanly to $mlm (chosen from $why)"
  exit 0
fi
(cd "$mlm" && git apply "$patch_file")
echo "apply_megatron_patch: applied $name to $mlm (chosen from $why)"
echo "  make sure megatron_sed is importable where pretrain_gpt.py runs (pip install megatron-sed)"
