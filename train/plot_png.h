// A small PNG chart writer for `convnext roadmap`: roadmap.png, a horizontal bar chart in the
// style of Figure 2 of "A ConvNet for the 2020s" (one row per roadmap step, top to bottom, the
// step's name on the left, our measured top-1 as a bar, the paper's ImageNet-1K top-1 as a
// thinner, lighter bar, each bar's value written at its end, a title, x axes and a legend).
//
// No plotting or font library: an RGB raster (Image), rectangles, text from a built-in 5x9 bitmap
// font (printable ASCII), and a PNG encoder that needs only zlib (compress2 for the pixel data,
// crc32 for the chunk checksums). Everything is in integer pixels, so a test can decode the file
// and find each bar exactly where the layout says it is.
//
// Two ways to draw the two series (BarChart::shared_axis):
//   false (default): two panels side by side that share the row labels, "ours" on the left and
//                    the paper's on the right, each with its own x axis. Our numbers (say 85..92
//                    on a small data set) and the paper's (78.8..82.0 on ImageNet) need not be
//                    comparable, and one axis spanning both would flatten the differences
//                    between steps, which are the point of the figure.
//   true:            one axis for both, each row's reference bar drawn under its own bar.
// Bars start at the left end of their axis, which is a round number a little below the smallest
// value (not 0): the figure is about differences of a few tenths of a percent.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace cnx::plot {

struct Color {
  uint8_t r = 0, g = 0, b = 0;
  friend bool operator==(const Color&, const Color&) = default;
};

// ---- the raster --------------------------------------------------------------------------------
// The built-in font: each glyph is 5x9 pixels at scale 1, rows 0..6 above the baseline (capitals
// and digits are 7 rows tall) and rows 7..8 for descenders (g, j, p, q, y, comma, underscore).
// Characters advance by 6 pixels (one blank column between glyphs). Every size is multiplied by
// the scale.
inline constexpr int kGlyphWidth = 5;
inline constexpr int kGlyphHeight = 9;
inline constexpr int kGlyphAdvance = 6;
inline constexpr int kCapHeight = 7;

// Width in pixels of `text` drawn at `scale`: from the first glyph's left edge to the last
// glyph's right edge (the trailing blank column is not counted); 0 for "".
int text_width(std::string_view text, int scale = 1);
// Height of a line of text, descenders included.
inline int text_height(int scale = 1) { return kGlyphHeight * scale; }

// An 8-bit RGB image, rows top to bottom, 3 bytes per pixel.
class Image {
 public:
  Image(int width, int height, Color background = {255, 255, 255});

  int width() const { return width_; }
  int height() const { return height_; }
  const std::vector<uint8_t>& rgb() const { return rgb_; }  // width*height*3 bytes

  Color pixel(int x, int y) const;  // cnx::Error outside the image
  // Drawing clips to the image: what falls outside is silently not drawn.
  void set_pixel(int x, int y, Color c);
  // Columns x .. x+w-1, rows y .. y+h-1; nothing when w or h <= 0.
  void fill_rect(int x, int y, int w, int h, Color c);
  // (x, y) is the top-left corner of the first glyph's cell: ink lies in columns
  // x .. x+text_width(text, scale)-1 and rows y .. y+text_height(scale)-1. Characters outside
  // printable ASCII (32..126) are drawn as '?'.
  void draw_text(int x, int y, std::string_view text, Color c, int scale = 1);

 private:
  int width_, height_;
  std::vector<uint8_t> rgb_;
};

// The image as a PNG file's bytes: 8-bit RGB, no interlacing, filter type 0 (none) on every
// row, the rows deflated by zlib in one IDAT chunk.
std::string encode_png(const Image& image);

// Writes `bytes` to `path` atomically: to path + ".tmp", then renamed over `path`, so a reader
// never sees half a file. cnx::Error naming the path on any failure (the .tmp is removed).
void write_file_atomically(const std::string& path, const std::string& bytes);

// ---- the bar chart -----------------------------------------------------------------------------
struct BarRow {
  std::string label;                 // e.g. "roadmap_03_patchify_stem"
  std::optional<double> ours;        // our measured value; none: not measured (yet)
  std::optional<double> reference;   // the paper's; none: the paper gives no figure
};

struct BarChart {
  std::string title;
  std::string ours_name = "ours";
  std::string reference_name = "paper (ImageNet-1K)";
  std::string unit = "top-1 (%)";    // written under each x axis
  bool shared_axis = false;          // see the top of this file
  std::vector<BarRow> rows;          // drawn top to bottom
};

// The colours of the bars (public so that tests can find them in the decoded image).
inline constexpr Color kOursColor{46, 94, 170};
inline constexpr Color kReferenceColor{240, 170, 100};

// A value axis: v maps to pixel column x0 + round((v - lo) / (hi - lo) * (x1 - x0)). A bar of
// value v covers the columns x0 .. x_of(v)-1, so its length in pixels is x_of(v) - x0.
struct Axis {
  double lo = 0, hi = 1, step = 1;   // ticks at lo, lo+step, ..., hi
  int x0 = 0, x1 = 1;
  int x_of(double v) const;
  std::vector<double> ticks() const;
};

// A round axis range for values in [min, max]: ticks at multiples of 1, 2 or 5 times a power
// of ten, about five of them; lo a little below min (so the smallest bar is still visible) and
// not below 0 when min >= 0; hi the first tick at or above max.
Axis nice_axis(double min, double max);

// Where everything goes (in pixels): computed first, then drawn, and returned so that tests
// can check the drawing against it.
struct BarChartLayout {
  struct Panel {
    std::string name;                // the panel's header ("" in shared-axis mode)
    Axis axis;
    bool ours = false, reference = false;  // which series this panel draws
  };
  int width = 0, height = 0;
  std::vector<Panel> panels;         // one (shared axis, or no reference values) or two
  std::vector<int> row_top;          // per row: the first pixel row of its band
  int row_height = 0;
  // Within a row's band, relative to row_top: ours first, then (shared axis) the reference.
  int ours_bar_top = 0, ours_bar_height = 0;
  int reference_bar_top = 0, reference_bar_height = 0;
};

// cnx::Error if there are no rows or a value is not finite.
BarChartLayout layout_bar_chart(const BarChart& chart);
Image draw_bar_chart(const BarChart& chart);
// draw_bar_chart + encode_png + write_file_atomically.
void write_bar_chart_png(const std::string& path, const BarChart& chart);

}  // namespace cnx::plot
