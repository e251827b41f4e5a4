"""`.npz` sources: `image` uint8 [N, H, W, C] and `label` [N], read in chunks with bounded RAM.

`np.load` on an .npz decompresses a whole member into memory (and cannot memory-map zip
members), which is 60 GB for 20M CIFAR-sized images. Instead we open the zip member as a stream,
parse its `.npy` header with `np.lib.format`, and read rows sequentially. This works for both
`np.savez` (stored) and `np.savez_compressed` (deflated) files, local or behind any pyarrow
filesystem URI. Memory is one chunk of rows, whatever the file size. A Fortran-ordered member
(rows interleaved, so not streamable by rows) is read whole, up to `FORTRAN_MAX_BYTES`.
"""

from __future__ import annotations

import tokenize
import zipfile
import zlib
from collections.abc import Iterator

import numpy as np

from puma_ray import storage
from puma_ray.errors import DataError

IMAGE_KEY, LABEL_KEY = "image", "label"
# A damaged member surfaces as any of these, depending on where the damage is.
_CORRUPT = (zipfile.BadZipFile, zlib.error, OSError, EOFError, ValueError)
# Largest Fortran-ordered image member read (whole, into memory); larger ones are refused.
FORTRAN_MAX_BYTES = 256 * 2**20


def _read_header(f, where: str) -> tuple[tuple[int, ...], bool, np.dtype]:
    try:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            return np.lib.format.read_array_header_1_0(f)
        if version == (2, 0):
            return np.lib.format.read_array_header_2_0(f)
        return np.lib.format._read_array_header(f, version)  # 3.0: no public reader
    except zlib.error as e:
        raise DataError(f"{where}: corrupt compressed data ({e})") from None
    except (*_CORRUPT, tokenize.TokenError, SyntaxError) as e:  # numpy tokenizes the header
        raise DataError(f"{where}: not a valid .npy array ({e})") from None


class NpzArrays:
    """An opened .npz source: validated headers, row count, streaming readers.

    Construction checks everything that needs no scan of the data: keys, ndim, dtype, that
    labels and images have the same length, non-empty. `check_labels` scans the (small) label
    member once, in chunks, for labels outside [0, num_classes).
    """

    def __init__(self, path: str, limit: int | None = None):
        self.path = path
        self._fs, self._fs_path = storage.resolve(path)
        with self._open_zip() as zf:
            names = {n.removesuffix(".npy"): n for n in zf.namelist()}
            missing = [k for k in (IMAGE_KEY, LABEL_KEY) if k not in names]
            if missing:
                raise DataError(
                    f"{path}: missing key(s) {missing}; found {sorted(names)} "
                    f"(want '{IMAGE_KEY}' uint8 NxHxWxC and '{LABEL_KEY}' integer N)"
                )
            self._members = {k: names[k] for k in (IMAGE_KEY, LABEL_KEY)}
            with self._open_member(zf, IMAGE_KEY) as f:
                shape, fortran, dtype = _read_header(f, f"{path}[{IMAGE_KEY}]")
            with self._open_member(zf, LABEL_KEY) as f:
                lshape, _, ldtype = _read_header(f, f"{path}[{LABEL_KEY}]")
        if len(shape) != 4:
            raise DataError(f"{path}: '{IMAGE_KEY}' has shape {shape}; want N x H x W x C (4-D)")
        if dtype != np.uint8:
            raise DataError(f"{path}: '{IMAGE_KEY}' has dtype {dtype}; want uint8 (0-255)")
        nbytes = int(np.prod(shape, dtype=np.int64))
        if fortran and nbytes > FORTRAN_MAX_BYTES:
            raise DataError(
                f"{path}: '{IMAGE_KEY}' is Fortran-ordered ({nbytes / 2**20:.0f} MiB), which "
                "cannot be read by rows; save it C-contiguous (np.ascontiguousarray)"
            )
        if not (len(lshape) == 1 or (len(lshape) == 2 and lshape[1] == 1)):
            raise DataError(f"{path}: '{LABEL_KEY}' has shape {lshape}; want (N,)")
        if ldtype.kind not in "iu" or ldtype.hasobject:
            raise DataError(f"{path}: '{LABEL_KEY}' has dtype {ldtype}; want integers")
        if lshape[0] != shape[0]:
            raise DataError(
                f"{path}: {lshape[0]} labels for {shape[0]} images (counts must be equal)"
            )
        if shape[0] == 0:
            raise DataError(f"{path}: empty source (0 rows)")
        self.image_shape = tuple(int(s) for s in shape[1:])
        self.total_rows = int(shape[0])
        self.num_rows = min(self.total_rows, limit) if limit else self.total_rows
        self._label_dtype = ldtype
        # labels are (N,) or (N, 1): the same bytes in either order
        self._fortran = bool(fortran)

    def _open_zip(self) -> zipfile.ZipFile:
        try:
            f = self._fs.open_input_file(self._fs_path)
        except FileNotFoundError:
            raise DataError(f"{self.path}: npz file not found") from None
        except OSError as e:
            raise DataError(f"{self.path}: cannot open ({e})") from None
        try:
            return zipfile.ZipFile(f)
        except (zipfile.BadZipFile, OSError, EOFError, ValueError):
            f.close()
            raise DataError(f"{self.path}: not an .npz file (not a zip archive)") from None

    def _open_member(self, zf: zipfile.ZipFile, key: str):
        try:
            return zf.open(self._members[key])
        except _CORRUPT as e:  # e.g. a damaged local file header
            raise DataError(f"{self.path}[{key}]: corrupt zip member ({e})") from None

    def _iter_rows(
        self, key: str, row_shape, dtype, chunk_rows: int, fortran: bool = False
    ) -> Iterator[np.ndarray]:
        row_bytes = int(np.prod(row_shape, dtype=np.int64)) * dtype.itemsize
        where = f"{self.path}[{key}]"
        with self._open_zip() as zf, self._open_member(zf, key) as f:
            _read_header(f, where)
            if fortran:  # rows are interleaved: read the whole (size-checked) member
                total = self.total_rows * row_bytes
                buf = self._read(f, total, where, 0)
                if len(buf) != total:
                    raise DataError(f"{where}: file ends before its last row")
                whole = np.frombuffer(buf, dtype).reshape(self.total_rows, *row_shape, order="F")
                for a in range(0, self.num_rows, chunk_rows):
                    yield np.ascontiguousarray(whole[a : min(self.num_rows, a + chunk_rows)])
                return
            done = 0
            while done < self.num_rows:
                n = min(chunk_rows, self.num_rows - done)
                buf = self._read(f, n * row_bytes, where, done)
                if len(buf) != n * row_bytes:
                    raise DataError(f"{where}: file ends at row {done + len(buf) // row_bytes}")
                yield np.frombuffer(buf, dtype).reshape(n, *row_shape)
                done += n

    @staticmethod
    def _read(f, nbytes: int, where: str, row: int) -> bytes:
        try:
            return f.read(nbytes)
        except _CORRUPT as e:
            raise DataError(f"{where}: corrupt at row {row} ({e})") from None

    def iter_labels(self, chunk_rows: int = 1 << 20) -> Iterator[np.ndarray]:
        for chunk in self._iter_rows(LABEL_KEY, (), self._label_dtype, chunk_rows):
            yield chunk.astype(np.int64)

    def check_labels(self, num_classes: int | None) -> np.ndarray:
        """Scan labels once; raise DataError if any is outside [0, num_classes). Returns the
        rows per class (length num_classes, or max label + 1 when num_classes is None)."""
        counts = np.zeros(num_classes or 0, np.int64)
        done = 0
        for chunk in self.iter_labels():
            lo, hi = int(chunk.min()), int(chunk.max())
            if lo < 0 or (num_classes is not None and hi >= num_classes):
                bad = np.flatnonzero((chunk < 0) | (chunk >= (num_classes or np.inf)))[0]
                raise DataError(
                    f"{self.path}: label {int(chunk[bad])} at row {done + bad} is outside "
                    f"[0, {num_classes}) (data.num_classes)"
                    if num_classes is not None
                    else f"{self.path}: negative label {int(chunk[bad])} at row {done + bad}"
                )
            c = np.bincount(chunk)
            if len(c) > len(counts):
                c[: len(counts)] += counts
                counts = c
            else:
                counts[: len(c)] += c
            done += len(chunk)
        return counts

    def iter_chunks(self, chunk_rows: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(images uint8 [m, H, W, C], labels int64 [m]) for consecutive rows, m <= chunk_rows.

        The image and label members are read side by side, each a sequential stream.
        """
        images = self._iter_rows(
            IMAGE_KEY, self.image_shape, np.dtype(np.uint8), chunk_rows, self._fortran
        )
        labels = self._iter_rows(LABEL_KEY, (), self._label_dtype, chunk_rows)
        for im, lb in zip(images, labels, strict=True):
            yield im, lb.astype(np.int64)
