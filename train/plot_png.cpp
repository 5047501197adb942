// The PNG chart writer: font, raster, PNG encoder, then the bar chart's layout and drawing.
#include "train/plot_png.h"

#include <zlib.h>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>

#include "tensor/error.h"

namespace cnx::plot {

// ================================================================================================
// The font
// ================================================================================================
// Printable ASCII 32..126, one glyph a line, drawn as text so that a reader can see (and fix) a
// glyph: '#' is ink, '.' is paper. Rows from the top; rows left out are blank, so most glyphs
// list 7 rows and only the ones with descenders list 8 or 9.
namespace {
constexpr const char* kFont[95][kGlyphHeight] = {
    /* ' ' */ {},
    /* '!' */ {"..#..", "..#..", "..#..", "..#..", "..#..", ".....", "..#.."},
    /* '"' */ {".#.#.", ".#.#.", ".#.#."},
    /* '#' */ {".#.#.", ".#.#.", "#####", ".#.#.", "#####", ".#.#.", ".#.#."},
    /* '$' */ {"..#..", ".####", "#.#..", ".###.", "..#.#", "####.", "..#.."},
    /* '%' */ {".#..#", "#.#.#", ".#.#.", "..#..", ".#.#.", "#.#.#", "#..#."},
    /* '&' */ {".##..", "#..#.", "#.#..", ".#...", "#.#.#", "#..#.", ".##.#"},
    /* '\'' */ {"..#..", "..#..", "..#.."},
    /* '(' */ {"...#.", "..#..", ".#...", ".#...", ".#...", "..#..", "...#."},
    /* ')' */ {".#...", "..#..", "...#.", "...#.", "...#.", "..#..", ".#..."},
    /* '*' */ {".....", "..#..", "#.#.#", ".###.", "#.#.#", "..#..", "....."},
    /* '+' */ {".....", "..#..", "..#..", "#####", "..#..", "..#..", "....."},
    /* ',' */ {".....", ".....", ".....", ".....", ".....", ".##..", ".##..", "..#..", ".#..."},
    /* '-' */ {".....", ".....", ".....", "#####", ".....", ".....", "....."},
    /* '.' */ {".....", ".....", ".....", ".....", ".....", ".##..", ".##.."},
    /* '/' */ {".....", "....#", "...#.", "..#..", ".#...", "#....", "....."},
    /* '0' */ {".###.", "#...#", "#..##", "#.#.#", "##..#", "#...#", ".###."},
    /* '1' */ {"..#..", ".##..", "..#..", "..#..", "..#..", "..#..", ".###."},
    /* '2' */ {".###.", "#...#", "....#", "...#.", "..#..", ".#...", "#####"},
    /* '3' */ {"#####", "...#.", "..#..", "...#.", "....#", "#...#", ".###."},
    /* '4' */ {"...#.", "..##.", ".#.#.", "#..#.", "#####", "...#.", "...#."},
    /* '5' */ {"#####", "#....", "####.", "....#", "....#", "#...#", ".###."},
    /* '6' */ {"..##.", ".#...", "#....", "####.", "#...#", "#...#", ".###."},
    /* '7' */ {"#####", "....#", "...#.", "..#..", ".#...", ".#...", ".#..."},
    /* '8' */ {".###.", "#...#", "#...#", ".###.", "#...#", "#...#", ".###."},
    /* '9' */ {".###.", "#...#", "#...#", ".####", "....#", "...#.", ".##.."},
    /* ':' */ {".....", ".##..", ".##..", ".....", ".##..", ".##..", "....."},
    /* ';' */ {".....", ".##..", ".##..", ".....", ".##..", ".##..", "..#..", ".#..."},
    /* '<' */ {"...#.", "..#..", ".#...", "#....", ".#...", "..#..", "...#."},
    /* '=' */ {".....", ".....", "#####", ".....", "#####", ".....", "....."},
    /* '>' */ {".#...", "..#..", "...#.", "....#", "...#.", "..#..", ".#..."},
    /* '?' */ {".###.", "#...#", "....#", "...#.", "..#..", ".....", "..#.."},
    /* '@' */ {".###.", "#...#", "....#", ".##.#", "#.#.#", "#.#.#", ".###."},
    /* 'A' */ {".###.", "#...#", "#...#", "#####", "#...#", "#...#", "#...#"},
    /* 'B' */ {"####.", "#...#", "#...#", "####.", "#...#", "#...#", "####."},
    /* 'C' */ {".###.", "#...#", "#....", "#....", "#....", "#...#", ".###."},
    /* 'D' */ {"###..", "#..#.", "#...#", "#...#", "#...#", "#..#.", "###.."},
    /* 'E' */ {"#####", "#....", "#....", "####.", "#....", "#....", "#####"},
    /* 'F' */ {"#####", "#....", "#....", "####.", "#....", "#....", "#...."},
    /* 'G' */ {".###.", "#...#", "#....", "#.###", "#...#", "#...#", ".####"},
    /* 'H' */ {"#...#", "#...#", "#...#", "#####", "#...#", "#...#", "#...#"},
    /* 'I' */ {".###.", "..#..", "..#..", "..#..", "..#..", "..#..", ".###."},
    /* 'J' */ {"..###", "...#.", "...#.", "...#.", "...#.", "#..#.", ".##.."},
    /* 'K' */ {"#...#", "#..#.", "#.#..", "##...", "#.#..", "#..#.", "#...#"},
    /* 'L' */ {"#....", "#....", "#....", "#....", "#....", "#....", "#####"},
    /* 'M' */ {"#...#", "##.##", "#.#.#", "#.#.#", "#...#", "#...#", "#...#"},
    /* 'N' */ {"#...#", "#...#", "##..#", "#.#.#", "#..##", "#...#", "#...#"},
    /* 'O' */ {".###.", "#...#", "#...#", "#...#", "#...#", "#...#", ".###."},
    /* 'P' */ {"####.", "#...#", "#...#", "####.", "#....", "#....", "#...."},
    /* 'Q' */ {".###.", "#...#", "#...#", "#...#", "#.#.#", "#..#.", ".##.#"},
    /* 'R' */ {"####.", "#...#", "#...#", "####.", "#.#..", "#..#.", "#...#"},
    /* 'S' */ {".####", "#....", "#....", ".###.", "....#", "....#", "####."},
    /* 'T' */ {"#####", "..#..", "..#..", "..#..", "..#..", "..#..", "..#.."},
    /* 'U' */ {"#...#", "#...#", "#...#", "#...#", "#...#", "#...#", ".###."},
    /* 'V' */ {"#...#", "#...#", "#...#", "#...#", "#...#", ".#.#.", "..#.."},
    /* 'W' */ {"#...#", "#...#", "#...#", "#.#.#", "#.#.#", "#.#.#", ".#.#."},
    /* 'X' */ {"#...#", "#...#", ".#.#.", "..#..", ".#.#.", "#...#", "#...#"},
    /* 'Y' */ {"#...#", "#...#", ".#.#.", "..#..", "..#..", "..#..", "..#.."},
    /* 'Z' */ {"#####", "....#", "...#.", "..#..", ".#...", "#....", "#####"},
    /* '[' */ {".###.", ".#...", ".#...", ".#...", ".#...", ".#...", ".###."},
    /* '\\' */ {".....", "#....", ".#...", "..#..", "...#.", "....#", "....."},
    /* ']' */ {".###.", "...#.", "...#.", "...#.", "...#.", "...#.", ".###."},
    /* '^' */ {"..#..", ".#.#.", "#...#"},
    /* '_' */ {".....", ".....", ".....", ".....", ".....", ".....", ".....", "#####"},
    /* '`' */ {".#...", "..#.."},
    /* 'a' */ {".....", ".....", ".###.", "....#", ".####", "#...#", ".####"},
    /* 'b' */ {"#....", "#....", "#.##.", "##..#", "#...#", "#...#", "####."},
    /* 'c' */ {".....", ".....", ".###.", "#....", "#....", "#...#", ".###."},
    /* 'd' */ {"....#", "....#", ".##.#", "#..##", "#...#", "#...#", ".####"},
    /* 'e' */ {".....", ".....", ".###.", "#...#", "#####", "#....", ".###."},
    /* 'f' */ {"..##.", ".#..#", ".#...", "###..", ".#...", ".#...", ".#..."},
    /* 'g' */ {".....", ".....", ".####", "#...#", "#...#", "#...#", ".####", "....#", ".###."},
    /* 'h' */ {"#....", "#....", "#.##.", "##..#", "#...#", "#...#", "#...#"},
    /* 'i' */ {"..#..", ".....", ".##..", "..#..", "..#..", "..#..", ".###."},
    /* 'j' */ {"...#.", ".....", "..##.", "...#.", "...#.", "...#.", "...#.", "#..#.", ".##.."},
    /* 'k' */ {"#....", "#....", "#..#.", "#.#..", "##...", "#.#..", "#..#."},
    /* 'l' */ {".##..", "..#..", "..#..", "..#..", "..#..", "..#..", ".###."},
    /* 'm' */ {".....", ".....", "##.#.", "#.#.#", "#.#.#", "#.#.#", "#.#.#"},
    /* 'n' */ {".....", ".....", "#.##.", "##..#", "#...#", "#...#", "#...#"},
    /* 'o' */ {".....", ".....", ".###.", "#...#", "#...#", "#...#", ".###."},
    /* 'p' */ {".....", ".....", "####.", "#...#", "#...#", "#...#", "####.", "#....", "#...."},
    /* 'q' */ {".....", ".....", ".####", "#...#", "#...#", "#...#", ".####", "....#", "....#"},
    /* 'r' */ {".....", ".....", "#.##.", "##..#", "#....", "#....", "#...."},
    /* 's' */ {".....", ".....", ".####", "#....", ".###.", "....#", "####."},
    /* 't' */ {".#...", ".#...", "###..", ".#...", ".#...", ".#..#", "..##."},
    /* 'u' */ {".....", ".....", "#...#", "#...#", "#...#", "#..##", ".##.#"},
    /* 'v' */ {".....", ".....", "#...#", "#...#", "#...#", ".#.#.", "..#.."},
    /* 'w' */ {".....", ".....", "#...#", "#...#", "#.#.#", "#.#.#", ".#.#."},
    /* 'x' */ {".....", ".....", "#...#", ".#.#.", "..#..", ".#.#.", "#...#"},
    /* 'y' */ {".....", ".....", "#...#", "#...#", "#...#", "#...#", ".####", "....#", ".###."},
    /* 'z' */ {".....", ".....", "#####", "...#.", "..#..", ".#...", "#####"},
    /* '{' */ {"...#.", "..#..", "..#..", ".#...", "..#..", "..#..", "...#."},
    /* '|' */ {"..#..", "..#..", "..#..", "..#..", "..#..", "..#..", "..#.."},
    /* '}' */ {".#...", "..#..", "..#..", "...#.", "..#..", "..#..", ".#..."},
    /* '~' */ {".....", ".....", ".#...", "#.#.#", "...#.", ".....", "....."},
};

// Row `row` (0..kGlyphHeight-1) of character c's glyph: "#...." style, or nullptr if blank.
const char* glyph_row(char c, int row) {
  const unsigned char u = static_cast<unsigned char>(c);
  const int index = (u >= 32 && u <= 126) ? u - 32 : '?' - 32;
  return kFont[index][row];
}
}  // namespace

int text_width(std::string_view text, int scale) {
  if (text.empty()) return 0;
  return (static_cast<int>(text.size()) * kGlyphAdvance - (kGlyphAdvance - kGlyphWidth)) * scale;
}

// ================================================================================================
// The raster
// ================================================================================================
Image::Image(int width, int height, Color background) : width_(width), height_(height) {
  // 16384 per side keeps the buffer under a gigabyte and is far beyond any chart we draw.
  CNX_CHECK(width > 0 && height > 0 && width <= 16384 && height <= 16384,
            "plot::Image: size ", width, "x", height, " is not in 1..16384 per side");
  rgb_.resize(static_cast<size_t>(width) * height * 3);
  for (size_t i = 0; i < rgb_.size(); i += 3) {
    rgb_[i] = background.r;
    rgb_[i + 1] = background.g;
    rgb_[i + 2] = background.b;
  }
}

Color Image::pixel(int x, int y) const {
  CNX_CHECK(x >= 0 && y >= 0 && x < width_ && y < height_, "plot::Image::pixel: (", x, ", ", y,
            ") is outside the ", width_, "x", height_, " image");
  const size_t i = (static_cast<size_t>(y) * width_ + x) * 3;
  return {rgb_[i], rgb_[i + 1], rgb_[i + 2]};
}

void Image::set_pixel(int x, int y, Color c) {
  if (x < 0 || y < 0 || x >= width_ || y >= height_) return;
  const size_t i = (static_cast<size_t>(y) * width_ + x) * 3;
  rgb_[i] = c.r;
  rgb_[i + 1] = c.g;
  rgb_[i + 2] = c.b;
}

void Image::fill_rect(int x, int y, int w, int h, Color c) {
  // Clip first (in 64 bits: x + w may overflow an int), then fill what is left.
  const int64_t xa = std::max<int64_t>(x, 0), xb = std::min<int64_t>(int64_t{x} + w, width_);
  const int64_t ya = std::max<int64_t>(y, 0), yb = std::min<int64_t>(int64_t{y} + h, height_);
  for (int64_t yy = ya; yy < yb; ++yy)
    for (int64_t xx = xa; xx < xb; ++xx) set_pixel(static_cast<int>(xx), static_cast<int>(yy), c);
}

void Image::draw_text(int x, int y, std::string_view text, Color c, int scale) {
  CNX_CHECK(scale >= 1 && scale <= 64, "plot::Image::draw_text: scale ", scale, " is not in 1..64");
  for (size_t k = 0; k < text.size(); ++k) {
    const int gx = x + static_cast<int>(k) * kGlyphAdvance * scale;
    for (int row = 0; row < kGlyphHeight; ++row) {
      const char* bits = glyph_row(text[k], row);
      if (bits == nullptr) continue;
      for (int col = 0; col < kGlyphWidth; ++col)
        if (bits[col] == '#') fill_rect(gx + col * scale, y + row * scale, scale, scale, c);
    }
  }
}

// ================================================================================================
// The PNG encoder
// ================================================================================================
// A PNG file is an 8-byte signature and then chunks: a 4-byte big-endian length of the data, a
// 4-byte type ("IHDR"), the data, and a CRC-32 of type and data. IHDR says the size and pixel
// format, IDAT holds the zlib stream of the rows, each row preceded by its filter type byte,
// IEND closes the file.
namespace {
void put_u32_be(std::string& out, uint32_t v) {
  out.push_back(static_cast<char>(v >> 24));
  out.push_back(static_cast<char>(v >> 16));
  out.push_back(static_cast<char>(v >> 8));
  out.push_back(static_cast<char>(v));
}

void put_chunk(std::string& out, const char type[4], const std::string& data) {
  CNX_CHECK(data.size() <= 0x7fffffffu, "encode_png: a ", type, " chunk of ", data.size(),
            " bytes exceeds PNG's 2^31-1");
  put_u32_be(out, static_cast<uint32_t>(data.size()));
  const size_t type_at = out.size();
  out.append(type, 4);
  out += data;
  // The CRC covers the type and the data, not the length.
  uLong crc = crc32(0L, Z_NULL, 0);
  crc = crc32(crc, reinterpret_cast<const Bytef*>(out.data() + type_at),
              static_cast<uInt>(4 + data.size()));
  put_u32_be(out, static_cast<uint32_t>(crc));
}
}  // namespace

std::string encode_png(const Image& image) {
  const int w = image.width(), h = image.height();
  std::string ihdr;
  put_u32_be(ihdr, static_cast<uint32_t>(w));
  put_u32_be(ihdr, static_cast<uint32_t>(h));
  ihdr.push_back(8);  // bits per sample
  ihdr.push_back(2);  // colour type 2: RGB
  ihdr.push_back(0);  // compression method 0: deflate (the only one)
  ihdr.push_back(0);  // filter method 0: the five per-row filters (we use type 0, none)
  ihdr.push_back(0);  // no interlacing

  // The filtered image: per row, the filter type byte 0 and the row's bytes unchanged.
  const size_t row_bytes = static_cast<size_t>(w) * 3;
  std::vector<Bytef> raw;
  raw.reserve((row_bytes + 1) * h);
  for (int y = 0; y < h; ++y) {
    raw.push_back(0);
    const uint8_t* row = image.rgb().data() + y * row_bytes;
    raw.insert(raw.end(), row, row + row_bytes);
  }
  uLongf packed_size = compressBound(static_cast<uLong>(raw.size()));
  std::string idat(packed_size, '\0');
  const int rc = compress2(reinterpret_cast<Bytef*>(idat.data()), &packed_size, raw.data(),
                           static_cast<uLong>(raw.size()), Z_BEST_COMPRESSION);
  CNX_CHECK(rc == Z_OK, "encode_png: zlib compress2 failed (", rc, ") on a ", w, "x", h, " image");
  idat.resize(packed_size);

  std::string png("\x89PNG\r\n\x1a\n", 8);
  put_chunk(png, "IHDR", ihdr);
  put_chunk(png, "IDAT", idat);
  put_chunk(png, "IEND", "");
  return png;
}

void write_file_atomically(const std::string& path, const std::string& bytes) {
  namespace fs = std::filesystem;
  const std::string tmp = path + ".tmp";
  {
    std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
    if (!out) fail(path, ": cannot write it (", tmp, ": ", std::strerror(errno), ")");
    out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
    out.close();
    if (!out) {
      std::error_code ignored;
      fs::remove(tmp, ignored);
      fail(path, ": cannot write it (", tmp, ": write failed, disk full?)");
    }
  }
  std::error_code ec;
  fs::rename(tmp, path, ec);
  if (ec) {
    std::error_code ignored;
    fs::remove(tmp, ignored);
    fail(path, ": cannot write it (renaming ", tmp, " over it: ", ec.message(), ")");
  }
}

// ================================================================================================
// The bar chart
// ================================================================================================
int Axis::x_of(double v) const {
  return x0 + static_cast<int>(std::lround((v - lo) / (hi - lo) * (x1 - x0)));
}

std::vector<double> Axis::ticks() const {
  const int n = static_cast<int>(std::lround((hi - lo) / step));
  std::vector<double> t;
  for (int i = 0; i <= n; ++i) t.push_back(lo + i * step);
  return t;
}

Axis nice_axis(double min, double max) {
  CNX_CHECK(std::isfinite(min) && std::isfinite(max) && min <= max, "nice_axis: [", min, ", ",
            max, "] is not a finite range");
  // One value (or all equal) still gets a readable axis around it.
  const double span = max > min ? max - min : std::max(std::abs(max) * 0.05, 1.0);
  // The axis starts a quarter of the data's span below the smallest value, so the shortest bar
  // is still a bar, but no lower than 0 for data that cannot be negative.
  double lo_wanted = min - 0.25 * span;
  if (min >= 0 && lo_wanted < 0) lo_wanted = 0;
  // About five ticks at 1, 2 or 5 times a power of ten.
  const double raw = std::max(max - lo_wanted, span) / 5;
  const double decade = std::pow(10.0, std::floor(std::log10(raw)));
  const double f = raw / decade;
  const double step = (f <= 1 ? 1 : f <= 2 ? 2 : f <= 5 ? 5 : 10) * decade;
  Axis a;
  a.step = step;
  // Whole multiples of step (the small slack absorbs 82.0/0.2 = 409.99999...).
  a.lo = std::floor(lo_wanted / step + 1e-9) * step;
  a.hi = std::ceil(max / step - 1e-9) * step;
  if (a.hi < a.lo + step) a.hi = a.lo + step;
  return a;
}

namespace {
// Pixel sizes of the chart: text at twice the font's size, the title at three times.
constexpr int kText = 2, kTitle = 3;
constexpr int kMargin = 28;
constexpr int kLabelGap = 16;      // between a row's label and its first panel
constexpr int kPlotWidth = 440;    // the span of an axis, lo to hi
constexpr int kPanelGap = 56;      // between one panel's value labels and the next panel
constexpr int kValueGap = 6;       // between a bar's end and its value
constexpr int kTickLength = 5;
constexpr int kSwatchWidth = 28;   // a legend entry's sample of its bar colour
// Vertical gaps: under the title, under the legend, under a panel's name, around tick labels.
constexpr int kTitleGap = 14, kLegendGap = 18, kHeaderGap = 8, kTickLabelGap = 6, kUnitGap = 8;

constexpr Color kInk{30, 30, 30};
constexpr Color kMutedInk{120, 120, 120};
constexpr Color kAxisColor{90, 90, 90};
constexpr Color kGridColor{222, 222, 222};
constexpr Color kBackground{255, 255, 255};
constexpr Color kZebraColor{245, 246, 248};

Color band_colour(size_t row) { return row % 2 == 1 ? kZebraColor : kBackground; }

std::string format_value(double v, int decimals) {
  char buf[64];
  std::snprintf(buf, sizeof buf, "%.*f", decimals, v);
  return buf;
}

// Enough decimals to tell the ticks apart: step 1 -> 0, 0.5 -> 1, 0.05 -> 2.
int tick_decimals(double step) {
  return std::max(0, static_cast<int>(-std::floor(std::log10(step) + 1e-9)));
}

// The vertical position of text whose capitals are centred on the pixel row `centre`.
int text_top_for_centre(int centre, int scale) { return centre - kCapHeight * scale / 2; }

// Bold: the glyphs drawn twice, one pixel apart (one column wider than text_width says).
void draw_bold_text(Image& img, int x, int y, std::string_view text, Color c, int scale) {
  img.draw_text(x, y, text, c, scale);
  img.draw_text(x + 1, y, text, c, scale);
}

// Text on a patch of `background` a little larger than its capitals, so that grid lines do not
// run through the digits of a value.
void draw_text_on(Image& img, int x, int y, std::string_view text, Color c, Color background, int scale) {
  img.fill_rect(x - 2, y - 2, text_width(text, scale) + 4, kCapHeight * scale + 4, background);
  img.draw_text(x, y, text, c, scale);
}

// Axis range of the given values; 0..100 if there are none (a panel with nothing measured yet).
Axis axis_for(const std::vector<double>& values) {
  if (values.empty()) return nice_axis(0, 100);
  const auto [lo, hi] = std::minmax_element(values.begin(), values.end());
  return nice_axis(*lo, *hi);
}
}  // namespace

BarChartLayout layout_bar_chart(const BarChart& chart) {
  CNX_CHECK(!chart.rows.empty(), "bar chart '", chart.title, "': no rows to draw");
  std::vector<double> ours, reference;
  for (size_t i = 0; i < chart.rows.size(); ++i) {
    const BarRow& r = chart.rows[i];
    CNX_CHECK(!r.ours || std::isfinite(*r.ours), "bar chart: row ", i, " ('", r.label,
              "') has a non-finite value for ", chart.ours_name);
    CNX_CHECK(!r.reference || std::isfinite(*r.reference), "bar chart: row ", i, " ('", r.label,
              "') has a non-finite value for ", chart.reference_name);
    if (r.ours) ours.push_back(*r.ours);
    if (r.reference) reference.push_back(*r.reference);
  }

  BarChartLayout L;
  if (chart.shared_axis) {
    std::vector<double> both = ours;
    both.insert(both.end(), reference.begin(), reference.end());
    L.panels.push_back({"", axis_for(both), true, !reference.empty()});
  } else {
    L.panels.push_back({chart.ours_name, axis_for(ours), true, false});
    // Without a single paper figure a second panel would be empty: leave it out.
    if (!reference.empty()) L.panels.push_back({chart.reference_name, axis_for(reference), false, true});
  }

  // Rows: a thick bar for ours and a thinner one for the reference, under it when they share
  // the axis, centred in the row in its own panel otherwise.
  L.ours_bar_top = 6;
  L.ours_bar_height = 22;
  if (chart.shared_axis) {
    L.reference_bar_top = L.ours_bar_top + L.ours_bar_height + 4;
    L.reference_bar_height = 12;
    L.row_height = L.reference_bar_top + L.reference_bar_height + 9;
  } else {
    L.row_height = L.ours_bar_top * 2 + L.ours_bar_height;
    L.reference_bar_height = 14;
    L.reference_bar_top = (L.row_height - L.reference_bar_height) / 2;
  }

  // Horizontal: margin | labels | gap | panel (axis span + room for the value at a bar's end)
  // | gap | panel ... | margin.
  int label_width = 0;
  for (const BarRow& r : chart.rows) label_width = std::max(label_width, text_width(r.label, kText));
  int x = kMargin + label_width + kLabelGap;
  for (BarChartLayout::Panel& p : L.panels) {
    int value_width = 0;
    for (const BarRow& r : chart.rows) {
      for (bool is_ours : {true, false}) {
        const std::optional<double>& v = is_ours ? r.ours : r.reference;
        if (v && (is_ours ? p.ours : p.reference))
          value_width = std::max(value_width, text_width(format_value(*v, 1), kText));
      }
    }
    p.axis.x0 = x;
    p.axis.x1 = x + kPlotWidth;
    x = p.axis.x1 + kValueGap + std::max(value_width, text_width("n/a", kText));
    // The last tick's label is centred on x1 and may stick out past the value labels.
    x = std::max(x, p.axis.x1 + text_width(format_value(p.axis.hi, tick_decimals(p.axis.step)), kText) / 2);
    x += kPanelGap;
  }
  const int content_right = x - kPanelGap + kMargin;

  // Vertical: title, legend, panel names (two panels only), rows, axis, tick labels, unit.
  int y = kMargin + text_height(kTitle) + kTitleGap;  // the legend's top
  y += text_height(kText) + kLegendGap;
  if (!chart.shared_axis) y += text_height(kText) + kHeaderGap;
  for (size_t i = 0; i < chart.rows.size(); ++i) {
    L.row_top.push_back(y);
    y += L.row_height;
  }
  y += 1 + kTickLength + kTickLabelGap + text_height(kText) + kUnitGap + text_height(kText) + kMargin;
  L.height = y;

  const int legend_width = kSwatchWidth + 8 + text_width(chart.ours_name, kText) + 28 +
                           kSwatchWidth + 8 + text_width(chart.reference_name, kText);
  L.width = std::max({content_right, 2 * kMargin + text_width(chart.title, kTitle),
                      2 * kMargin + legend_width});
  return L;
}

Image draw_bar_chart(const BarChart& chart) {
  const BarChartLayout L = layout_bar_chart(chart);
  Image img(L.width, L.height, kBackground);
  const bool any_reference =
      std::any_of(chart.rows.begin(), chart.rows.end(), [](const BarRow& r) { return r.reference.has_value(); });

  // Title and legend.
  draw_bold_text(img, kMargin, kMargin, chart.title, kInk, kTitle);
  const int legend_y = kMargin + text_height(kTitle) + kTitleGap;
  int lx = kMargin;
  // Our swatch is as tall as the capitals beside it.
  img.fill_rect(lx, legend_y, kSwatchWidth, kCapHeight * kText, kOursColor);
  lx += kSwatchWidth + 8;
  img.draw_text(lx, legend_y, chart.ours_name, kInk, kText);
  lx += text_width(chart.ours_name, kText) + 28;
  if (any_reference) {
    // The legend's reference swatch is as thin, relative to ours, as the bars.
    const int h = kCapHeight * kText * L.reference_bar_height / L.ours_bar_height;
    img.fill_rect(lx, legend_y + (kCapHeight * kText - h) / 2, kSwatchWidth, h, kReferenceColor);
    lx += kSwatchWidth + 8;
    img.draw_text(lx, legend_y, chart.reference_name, kInk, kText);
  }

  const int rows_top = L.row_top.front();
  const int rows_bottom = L.row_top.back() + L.row_height;  // the x axis line's pixel row

  // Alternate rows get a faint band across the whole chart, so that the eye can follow a row
  // from its label to the second panel.
  for (size_t i = 0; i < L.row_top.size(); ++i)
    img.fill_rect(kMargin, L.row_top[i], L.width - 2 * kMargin, L.row_height, band_colour(i));

  for (const BarChartLayout::Panel& p : L.panels) {
    const Axis& a = p.axis;
    if (!p.name.empty())
      draw_bold_text(img, a.x0, rows_top - kHeaderGap - text_height(kText), p.name, kInk, kText);
    // Grid lines behind the bars, then the axes: the left spine just left of the bars' first
    // column, the x axis just under the last row.
    const int decimals = tick_decimals(a.step);
    for (double t : a.ticks()) {
      const int tx = a.x_of(t);
      if (tx > a.x0) img.fill_rect(tx, rows_top, 1, rows_bottom - rows_top, kGridColor);
      img.fill_rect(tx, rows_bottom, 1, kTickLength + 1, kAxisColor);
      const std::string s = format_value(t, decimals);
      img.draw_text(tx - text_width(s, kText) / 2, rows_bottom + 1 + kTickLength + kTickLabelGap, s, kInk, kText);
    }
    img.fill_rect(a.x0 - 1, rows_top, 1, rows_bottom - rows_top, kAxisColor);
    img.fill_rect(a.x0 - 1, rows_bottom, a.x1 - a.x0 + 1, 1, kAxisColor);
    const int unit_y = rows_bottom + 1 + kTickLength + kTickLabelGap + text_height(kText) + kUnitGap;
    img.draw_text((a.x0 + a.x1 - text_width(chart.unit, kText)) / 2, unit_y, chart.unit, kMutedInk, kText);

    for (size_t i = 0; i < chart.rows.size(); ++i) {
      const BarRow& r = chart.rows[i];
      const Color band = band_colour(i);
      auto bar = [&](const std::optional<double>& v, int top, int height, Color color, Color text) {
        const int centre = L.row_top[i] + top + height / 2;
        const int text_y = text_top_for_centre(centre, kText);
        if (!v) {
          // In its own panel a missing value says so; under our bar (shared axis) it is just absent.
          if (!chart.shared_axis) draw_text_on(img, a.x0 + kValueGap, text_y, "n/a", kMutedInk, band, kText);
          return;
        }
        const int end = a.x_of(*v);
        img.fill_rect(a.x0, L.row_top[i] + top, end - a.x0, height, color);
        draw_text_on(img, end + kValueGap, text_y, format_value(*v, 1), text, band, kText);
      };
      if (p.ours) bar(r.ours, L.ours_bar_top, L.ours_bar_height, kOursColor, kInk);
      if (p.reference) bar(r.reference, L.reference_bar_top, L.reference_bar_height, kReferenceColor, kMutedInk);
    }
  }

  // Row labels, right-aligned against the first panel, centred on our bar.
  const int label_right = L.panels.front().axis.x0 - kLabelGap;
  for (size_t i = 0; i < chart.rows.size(); ++i) {
    const int centre = L.row_top[i] + L.ours_bar_top + L.ours_bar_height / 2;
    const std::string& s = chart.rows[i].label;
    img.draw_text(label_right - text_width(s, kText), text_top_for_centre(centre, kText), s, kInk, kText);
  }
  return img;
}

void write_bar_chart_png(const std::string& path, const BarChart& chart) {
  write_file_atomically(path, encode_png(draw_bar_chart(chart)));
}

}  // namespace cnx::plot
