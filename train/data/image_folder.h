// An ImageFolder dataset (the official ImageNet layout) read with libjpeg-turbo:
//
//   root/train/<class>/<file>     root/val/<class>/<file>
//
// The classes of a split are its sorted (byte-wise) folder names; the label of a file is the
// index of its folder in that list. When both train and val exist they must have the same class
// folders (else a cnx::Error naming both folders and the first names that differ). Samples are
// the regular files directly inside a class folder (sub-folders are not descended into), sorted
// by class, then by file name. Names that start with '.' (hidden files and folders) are
// ignored everywhere.
//
// Indexing is separate from decoding: scan_image_folder only lists folders (an ImageNet-sized
// split does not fit in memory decoded), decode_jpeg decodes one file when it is needed.
//
// Whether a file is a JPEG is decided by its content (the SOI marker FF D8 FF), not its name.
// Other files (PNG included) are not decoded: decode_jpeg returns false with a reason and the
// caller skips the file (warn_skipped + DecodeStats).
//
// Decoding rule for damaged files: a file decodes when its header is complete (dimensions and
// tables readable), it declares at most kMaxImagePixels (train/data/dataset.h: Pillow's
// decompression-bomb limit, checked from the header before anything is allocated) and
// libjpeg-turbo decodes its pixels without an error or a warning. A JPEG cut short in its
// entropy-coded data therefore fails: libjpeg-turbo warns "Premature end of JPEG file" and
// would fill the missing rows with grey, which is a bad training sample, not an image. The one
// warning allowed is "Corrupt JPEG data: N extraneous bytes before marker 0xXX" (garbage
// between two markers, skipped; the image is complete; a few ImageNet files have it and Pillow
// decodes them silently). A file cut inside its header, a zero-byte file, a non-JPEG file, a
// FIFO, folder or device (refused before it is opened), or one whose data raise a libjpeg
// error or warning is a failure.
//
// Colour: every JPEG is returned as 8-bit RGB. Grayscale JPEGs are expanded (R = G = B) by
// libjpeg-turbo. CMYK and YCCK JPEGs cannot be converted to RGB by libjpeg-turbo 2.1
// ("Unsupported color conversion request"), so they are decoded to CMYK and converted here
// with libjpeg-turbo's own convention (Adobe's inverted CMYK, as stored by Photoshop and by
// tjCompress2 from TJPF_CMYK): R = C * K / 255, G = M * K / 255, B = Y * K / 255 (rounded).
//
// Errors from scan_image_folder are cnx::Error of one line "image_folder: <path>: <problem>".
#pragma once

#include <atomic>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

namespace cnx {

struct ImageFolder {
  std::string root, split;
  std::vector<std::string> classes;  // sorted folder names of root/split
  // (path, label), sorted by class then file name; path is root/split/<class>/<file>.
  std::vector<std::pair<std::string, int64_t>> samples;
};

// Lists root/split. Throws cnx::Error when root or root/split is missing, not a folder or
// unreadable, when it has no class folders, when a class folder has no (non-hidden) files
// (naming that folder), or when split is "train" or "val" and the other of the two exists with
// different class folders.
ImageFolder scan_image_folder(const std::string& root, const std::string& split);

struct DecodedImage {
  int64_t H = 0, W = 0;
  std::vector<uint8_t> rgb;  // (H, W, 3)
};

// Decodes the JPEG at `path` to RGB (rules above). Returns false and sets `error` to a one-line
// reason (without the path) for a missing, unreadable, not regular, zero-byte, non-JPEG,
// too large (kMaxImagePixels), corrupt or truncated file; `out` is then unspecified. Never throws on bad file content and is
// safe to call from several threads at once.
bool decode_jpeg(const std::string& path, DecodedImage& out, std::string& error);

// Prints "image_folder: skipping <path>: <reason>" on stderr as one line (thread-safe: lines
// from several threads do not interleave).
void warn_skipped(const std::string& path, const std::string& reason);

// Counts decode attempts and failures (thread-safe).
class DecodeStats {
 public:
  void record(bool ok) {
    total_.fetch_add(1, std::memory_order_relaxed);
    if (!ok) failed_.fetch_add(1, std::memory_order_relaxed);
  }
  int64_t failed() const { return failed_.load(std::memory_order_relaxed); }
  int64_t total() const { return total_.load(std::memory_order_relaxed); }
  // Throws cnx::Error when failed / out_of > max_fraction (in [0, 1]), e.g.
  // "image_folder: 12 of 40 files (30%) could not be decoded, more than the allowed 10%".
  // out_of is the number of files the failures are measured against: the attempts so far
  // (total(), the default), or a whole split's size, which a loader checking while an epoch is
  // under way passes so that a few early failures do not trip it. Nothing happens while it is 0.
  void check(double max_fraction, int64_t out_of = -1) const;
  void reset() {
    failed_.store(0, std::memory_order_relaxed);
    total_.store(0, std::memory_order_relaxed);
  }

 private:
  std::atomic<int64_t> failed_{0}, total_{0};
};

// decode_jpeg, and on failure warn_skipped; records the outcome in `stats` when not null.
bool decode_jpeg_or_warn(const std::string& path, DecodedImage& out, DecodeStats* stats);

}  // namespace cnx
