// The PNG chart writer (train/plot_png.h). Every check reads the encoded file back through the
// small PNG decoder below, written from the PNG specification independently of the encoder (it
// verifies the signature, the chunk layout, IHDR and every CRC, inflates IDAT and undoes the
// row filters), so a test sees the pixels a viewer would see.
#include <gtest/gtest.h>
#include <zlib.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <string>
#include <vector>

#include "tensor/error.h"
#include "train/plot_png.h"

using namespace cnx::plot;
namespace fs = std::filesystem;

namespace {

// ---- an independent PNG decoder (8-bit RGB, non-interlaced: what the encoder promises) ----------
struct Decoded {
  int width = 0, height = 0;
  std::vector<std::string> chunk_types;  // in file order
  std::vector<uint8_t> rgb;              // width*height*3
  Color at(int x, int y) const {
    const size_t i = (static_cast<size_t>(y) * width + x) * 3;
    return {rgb[i], rgb[i + 1], rgb[i + 2]};
  }
};

uint32_t read_u32_be(const std::string& s, size_t at) {
  return (uint32_t(uint8_t(s[at])) << 24) | (uint32_t(uint8_t(s[at + 1])) << 16) |
         (uint32_t(uint8_t(s[at + 2])) << 8) | uint32_t(uint8_t(s[at + 3]));
}

// ADD_FAILUREs on anything wrong and returns what it could decode.
Decoded decode_png(const std::string& png) {
  Decoded d;
  const std::string signature("\x89PNG\r\n\x1a\n", 8);
  if (png.size() < 8 || png.compare(0, 8, signature) != 0) {
    ADD_FAILURE() << "no PNG signature";
    return d;
  }
  std::string idat;
  int bit_depth = -1, colour_type = -1, compression = -1, filter = -1, interlace = -1;
  size_t at = 8;
  while (at < png.size()) {
    if (at + 12 > png.size()) {
      ADD_FAILURE() << "truncated chunk header at byte " << at;
      return d;
    }
    const uint32_t length = read_u32_be(png, at);
    if (at + 12 + length > png.size()) {
      ADD_FAILURE() << "chunk at byte " << at << " runs past the end";
      return d;
    }
    const std::string type = png.substr(at + 4, 4);
    const std::string data = png.substr(at + 8, length);
    const uint32_t stored_crc = read_u32_be(png, at + 8 + length);
    const uLong crc = crc32(crc32(0L, Z_NULL, 0),
                            reinterpret_cast<const Bytef*>(png.data() + at + 4), 4 + length);
    EXPECT_EQ(stored_crc, static_cast<uint32_t>(crc)) << "CRC of chunk " << type;
    d.chunk_types.push_back(type);
    if (type == "IHDR") {
      EXPECT_EQ(length, 13u);
      d.width = static_cast<int>(read_u32_be(data, 0));
      d.height = static_cast<int>(read_u32_be(data, 4));
      bit_depth = uint8_t(data[8]);
      colour_type = uint8_t(data[9]);
      compression = uint8_t(data[10]);
      filter = uint8_t(data[11]);
      interlace = uint8_t(data[12]);
    } else if (type == "IDAT") {
      idat += data;
    }
    at += 12 + length;
  }
  EXPECT_EQ(bit_depth, 8);
  EXPECT_EQ(colour_type, 2);  // RGB
  EXPECT_EQ(compression, 0);
  EXPECT_EQ(filter, 0);
  EXPECT_EQ(interlace, 0);
  if (d.width <= 0 || d.height <= 0) {
    ADD_FAILURE() << "IHDR size " << d.width << "x" << d.height;
    return d;
  }

  const size_t stride = static_cast<size_t>(d.width) * 3;
  std::vector<Bytef> raw((stride + 1) * d.height);
  uLongf raw_size = raw.size();
  const int rc = uncompress(raw.data(), &raw_size, reinterpret_cast<const Bytef*>(idat.data()),
                            idat.size());
  EXPECT_EQ(rc, Z_OK) << "inflating IDAT";
  EXPECT_EQ(raw_size, raw.size()) << "inflated size";
  if (rc != Z_OK) return d;
  d.rgb.resize(stride * d.height);
  for (int y = 0; y < d.height; ++y) {
    const Bytef* line = raw.data() + y * (stride + 1);
    // The encoder promises filter type 0 (the bytes are the pixels as they are).
    EXPECT_EQ(line[0], 0) << "filter type of row " << y;
    std::copy(line + 1, line + 1 + stride, d.rgb.begin() + y * stride);
  }
  return d;
}

std::string read_file(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}

// Pixels of colour c in rows y0..y1-1 and columns x0..x1-1.
int count(const Decoded& d, Color c, int x0, int x1, int y0, int y1) {
  int n = 0;
  for (int y = y0; y < y1; ++y)
    for (int x = x0; x < x1; ++x) n += d.at(x, y) == c;
  return n;
}

// The length of the run of colour c on pixel row y that starts at column x0 (0 if none).
int run_length(const Decoded& d, Color c, int x0, int y) {
  int x = x0;
  while (x < d.width && d.at(x, y) == c) ++x;
  return x - x0;
}

constexpr Color kWhite{255, 255, 255};
constexpr Color kRed{200, 10, 20};

// Three rows with ours in 85..92 and the paper's in 79..82; row 1 optionally without a paper value.
BarChart three_rows(bool shared_axis, bool middle_reference = true) {
  BarChart c;
  c.title = "three steps";
  c.shared_axis = shared_axis;
  c.rows = {{"roadmap_00_resnet50", 85.0, 79.0},
            {"roadmap_01_stage_ratio", 88.5, middle_reference ? std::optional<double>(80.5) : std::nullopt},
            {"roadmap_02_patchify_stem", 92.0, 82.0}};
  return c;
}

// The scan line through the middle of row i's bar of one series.
int bar_centre_y(const BarChartLayout& L, size_t i, bool ours) {
  return L.row_top[i] + (ours ? L.ours_bar_top + L.ours_bar_height / 2
                              : L.reference_bar_top + L.reference_bar_height / 2);
}

}  // namespace

// ---- PNG encoding ------------------------------------------------------------------------------
TEST(PlotPng, ThreeByTwoImageRoundTripsBitwise) {
  Image img(3, 2, kWhite);
  const Color px[2][3] = {{{0, 0, 0}, {255, 0, 0}, {0, 255, 0}}, {{0, 0, 255}, {1, 2, 3}, {254, 128, 7}}};
  for (int y = 0; y < 2; ++y)
    for (int x = 0; x < 3; ++x) img.set_pixel(x, y, px[y][x]);
  const Decoded d = decode_png(encode_png(img));
  ASSERT_EQ(d.width, 3);
  ASSERT_EQ(d.height, 2);
  EXPECT_EQ(d.chunk_types, (std::vector<std::string>{"IHDR", "IDAT", "IEND"}));
  EXPECT_EQ(d.rgb, img.rgb());
  for (int y = 0; y < 2; ++y)
    for (int x = 0; x < 3; ++x) EXPECT_EQ(d.at(x, y), px[y][x]) << x << "," << y;
}

TEST(PlotPng, LargerImageRoundTripsBitwise) {
  // Many rows and a width that is not a multiple of anything, so that a slip in the row stride
  // or the filter bytes would show.
  Image img(131, 77, kWhite);
  for (int y = 0; y < img.height(); ++y)
    for (int x = 0; x < img.width(); ++x)
      img.set_pixel(x, y, {uint8_t(x * 7 + y), uint8_t(x ^ (y * 3)), uint8_t(x * y)});
  const Decoded d = decode_png(encode_png(img));
  ASSERT_EQ(d.width, 131);
  ASSERT_EQ(d.height, 77);
  EXPECT_EQ(d.rgb, img.rgb());
}

// ---- the raster --------------------------------------------------------------------------------
TEST(PlotPng, FillRectColoursExactlyItsPixels) {
  Image img(10, 8, kWhite);
  img.fill_rect(2, 3, 4, 2, kRed);   // columns 2..5, rows 3..4
  img.fill_rect(-3, -3, 4, 5, {0, 0, 255});  // clipped to column 0, rows 0..1
  img.fill_rect(8, 6, 5, 5, {0, 255, 0});    // clipped to columns 8..9, rows 6..7
  img.fill_rect(1, 1, 0, 3, {9, 9, 9});      // empty: nothing
  img.fill_rect(1, 1, 3, -1, {9, 9, 9});     // empty: nothing
  const Decoded d = decode_png(encode_png(img));
  ASSERT_EQ(d.rgb.size(), 10u * 8 * 3);
  for (int y = 0; y < 8; ++y) {
    for (int x = 0; x < 10; ++x) {
      Color want = kWhite;
      if (x >= 2 && x <= 5 && y >= 3 && y <= 4) want = kRed;
      if (x == 0 && y <= 1) want = {0, 0, 255};
      if (x >= 8 && y >= 6) want = {0, 255, 0};
      EXPECT_EQ(d.at(x, y), want) << "pixel " << x << "," << y;
    }
  }
}

TEST(PlotPng, DrawTextInksTheGlyphAndNothingElse) {
  // The glyph of '1', written out here independently of the font table.
  const char* one[kGlyphHeight] = {"..#..", ".##..", "..#..", "..#..", "..#..",
                                   "..#..", ".###.", ".....", "....."};
  const int scale = 2, x0 = 4, y0 = 5;
  Image img(30, 30, kWhite);
  img.draw_text(x0, y0, "1", kRed, scale);
  const Decoded d = decode_png(encode_png(img));
  ASSERT_EQ(d.width, 30);
  const int w = text_width("1", scale), h = text_height(scale);
  EXPECT_EQ(w, kGlyphWidth * scale);
  int ink = 0;
  for (int y = 0; y < 30; ++y) {
    for (int x = 0; x < 30; ++x) {
      const bool inside = x >= x0 && x < x0 + w && y >= y0 && y < y0 + h;
      const bool want = inside && one[(y - y0) / scale][(x - x0) / scale] == '#';
      EXPECT_EQ(d.at(x, y), want ? kRed : kWhite) << "pixel " << x << "," << y;
      ink += d.at(x, y) == kRed;
    }
  }
  EXPECT_EQ(ink, 10 * scale * scale);  // the glyph has 10 inked cells
}

TEST(PlotPng, TextWidthMatchesWhatIsDrawn) {
  EXPECT_EQ(text_width("", 2), 0);
  EXPECT_EQ(text_width("1", 1), 5);
  EXPECT_EQ(text_width("11", 1), 11);  // 5 + 1 blank + 5
  EXPECT_EQ(text_width("11", 3), 33);
  EXPECT_EQ(text_height(2), 18);
  // "H_H" drawn: the ink spans exactly text_width columns (H inks its first and last column).
  Image img(40, 20, kWhite);
  img.draw_text(3, 2, "H_H", kRed, 1);
  int left = 40, right = -1, top = 20, bottom = -1;
  for (int y = 0; y < 20; ++y)
    for (int x = 0; x < 40; ++x)
      if (img.pixel(x, y) == kRed) {
        left = std::min(left, x), right = std::max(right, x);
        top = std::min(top, y), bottom = std::max(bottom, y);
      }
  EXPECT_EQ(left, 3);
  EXPECT_EQ(right - left + 1, text_width("H_H", 1));
  EXPECT_EQ(top, 2);
  EXPECT_LE(bottom, 2 + text_height(1) - 1);  // the underscore sits in the descender rows
  EXPECT_GE(bottom, 2 + kCapHeight);
  // Every printable character draws something, except the space; the rest become '?'.
  for (int c = 33; c <= 126; ++c) {
    Image g(8, 12, kWhite);
    g.draw_text(1, 1, std::string(1, char(c)), kRed);
    int n = 0;
    for (int y = 0; y < 12; ++y)
      for (int x = 0; x < 8; ++x) n += g.pixel(x, y) == kRed;
    EXPECT_GT(n, 0) << "glyph '" << char(c) << "' is blank";
  }
  Image a(8, 12, kWhite), b(8, 12, kWhite);
  a.draw_text(1, 1, "\x07", kRed);
  b.draw_text(1, 1, "?", kRed);
  EXPECT_EQ(a.rgb(), b.rgb());
}

TEST(PlotPng, ImageRejectsBadSizesAndPixels) {
  EXPECT_THROW(Image(0, 5), cnx::Error);
  EXPECT_THROW(Image(5, -1), cnx::Error);
  EXPECT_THROW(Image(100000, 10), cnx::Error);
  Image img(4, 3);
  EXPECT_THROW(img.pixel(4, 0), cnx::Error);
  EXPECT_THROW(img.pixel(0, -1), cnx::Error);
  img.set_pixel(-1, 0, kRed);  // clipped, not an error
  img.set_pixel(0, 3, kRed);
  EXPECT_EQ(img.rgb(), Image(4, 3).rgb());
}

// ---- axes --------------------------------------------------------------------------------------
TEST(PlotPng, NiceAxisPicksRoundTicksAroundTheData) {
  Axis a = nice_axis(85, 92);  // ours on a small data set
  EXPECT_DOUBLE_EQ(a.lo, 82);
  EXPECT_DOUBLE_EQ(a.hi, 92);
  EXPECT_DOUBLE_EQ(a.step, 2);
  a = nice_axis(78.8, 82.0);  // the paper's Figure 2
  EXPECT_DOUBLE_EQ(a.lo, 78);
  EXPECT_DOUBLE_EQ(a.hi, 82);
  EXPECT_DOUBLE_EQ(a.step, 1);
  EXPECT_EQ(a.ticks(), (std::vector<double>{78, 79, 80, 81, 82}));
  a = nice_axis(10, 90);  // never below 0 for data that is not
  EXPECT_DOUBLE_EQ(a.lo, 0);
  EXPECT_DOUBLE_EQ(a.hi, 100);
  a = nice_axis(0, 0);  // degenerate data still gets an axis
  EXPECT_LT(a.lo, a.hi);
  a = nice_axis(50, 50);
  EXPECT_LT(a.lo, 50);
  EXPECT_GE(a.hi, 50);
  for (auto [lo, hi] : {std::pair{0.1, 0.35}, {-3.0, 4.0}, {99.1, 99.9}, {1e-3, 2e-3}}) {
    const Axis b = nice_axis(lo, hi);
    EXPECT_LT(b.lo, lo);
    EXPECT_GE(b.hi, hi);
    const size_t n = b.ticks().size();
    EXPECT_TRUE(n >= 3 && n <= 12) << lo << ".." << hi << ": " << n << " ticks";
  }
  EXPECT_THROW(nice_axis(2, 1), cnx::Error);
}

// ---- the bar chart -----------------------------------------------------------------------------
TEST(PlotPng, BarLengthsAreProportionalToTheirValues) {
  for (bool shared : {false, true}) {
    SCOPED_TRACE(shared ? "one shared axis" : "two panels");
    const BarChart chart = three_rows(shared);
    const BarChartLayout L = layout_bar_chart(chart);
    const Decoded d = decode_png(encode_png(draw_bar_chart(chart)));
    ASSERT_EQ(d.width, L.width);
    ASSERT_EQ(d.height, L.height);
    ASSERT_EQ(L.panels.size(), shared ? 1u : 2u);
    if (!shared) {  // the data's ranges give these axes (see NiceAxisPicksRoundTicksAroundTheData)
      EXPECT_DOUBLE_EQ(L.panels[0].axis.lo, 82);
      EXPECT_DOUBLE_EQ(L.panels[0].axis.hi, 92);
      EXPECT_DOUBLE_EQ(L.panels[1].axis.lo, 78);
      EXPECT_DOUBLE_EQ(L.panels[1].axis.hi, 82);
    }
    for (bool ours : {true, false}) {
      const Axis& a = (shared || ours) ? L.panels[0].axis : L.panels[1].axis;
      const Color colour = ours ? kOursColor : kReferenceColor;
      std::vector<int> measured;
      for (size_t i = 0; i < chart.rows.size(); ++i) {
        const double v = ours ? *chart.rows[i].ours : *chart.rows[i].reference;
        const int y = bar_centre_y(L, i, ours);
        // The bar starts at the axis' first column, not before it.
        EXPECT_NE(d.at(a.x0 - 1, y), colour);
        const int length = run_length(d, colour, a.x0, y);
        const double want = (v - a.lo) / (a.hi - a.lo) * (a.x1 - a.x0);
        EXPECT_NEAR(length, want, 1.0) << (ours ? "ours" : "reference") << " bar of row " << i << " (" << v << ")";
        // And it is exactly as thick as the layout says.
        const int x = a.x0 + length / 2;
        int top = y, bottom = y;
        while (d.at(x, top - 1) == colour) --top;
        while (d.at(x, bottom + 1) == colour) ++bottom;
        EXPECT_EQ(bottom - top + 1, ours ? L.ours_bar_height : L.reference_bar_height);
        measured.push_back(length);
      }
      // Independently of the axis: equal steps in value are equal steps in pixels (the rows'
      // values are evenly spaced: 85, 88.5, 92 and 79, 80.5, 82).
      EXPECT_NEAR(measured[1] - measured[0], measured[2] - measured[1], 1.0);
      EXPECT_LT(measured[0], measured[1]);
    }
    // The reference bars are thinner than ours.
    EXPECT_LT(L.reference_bar_height, L.ours_bar_height);
  }
}

TEST(PlotPng, MissingValuesDrawNoBar) {
  for (bool shared : {false, true}) {
    SCOPED_TRACE(shared ? "one shared axis" : "two panels");
    const BarChart chart = three_rows(shared, /*middle_reference=*/false);
    const BarChartLayout L = layout_bar_chart(chart);
    const Decoded d = decode_png(encode_png(draw_bar_chart(chart)));
    for (size_t i = 0; i < 3; ++i) {
      const int band = count(d, kReferenceColor, 0, d.width, L.row_top[i], L.row_top[i] + L.row_height);
      if (i == 1) EXPECT_EQ(band, 0) << "row 1 has no paper value but a reference bar";
      else EXPECT_GT(band, 0) << "row " << i;
      EXPECT_GT(count(d, kOursColor, 0, d.width, L.row_top[i], L.row_top[i] + L.row_height), 0);
    }
  }
  // No paper values at all: one panel, and no reference colour anywhere (legend included).
  BarChart none = three_rows(false);
  for (BarRow& r : none.rows) r.reference.reset();
  none.rows[2].ours.reset();  // and one step not measured yet
  const BarChartLayout L = layout_bar_chart(none);
  EXPECT_EQ(L.panels.size(), 1u);
  const Decoded d = decode_png(encode_png(draw_bar_chart(none)));
  EXPECT_EQ(count(d, kReferenceColor, 0, d.width, 0, d.height), 0);
  EXPECT_EQ(count(d, kOursColor, 0, d.width, L.row_top[2], L.row_top[2] + L.row_height), 0);
}

TEST(PlotPng, WritesTheFileAtomically) {
  const fs::path dir = fs::temp_directory_path() / "cnx_plot_png_write";
  fs::remove_all(dir);
  fs::create_directories(dir);
  const fs::path path = dir / "roadmap.png";
  std::ofstream(path) << "an older roadmap.png";
  write_bar_chart_png(path.string(), three_rows(false));
  EXPECT_FALSE(fs::exists(path.string() + ".tmp"));
  const Decoded d = decode_png(read_file(path));
  EXPECT_EQ(d.width, layout_bar_chart(three_rows(false)).width);
  EXPECT_EQ(d.chunk_types, (std::vector<std::string>{"IHDR", "IDAT", "IEND"}));
  fs::remove_all(dir);
}

TEST(PlotPng, UnwritablePathThrowsNamingItAndLeavesNoTemporary) {
  const fs::path dir = fs::temp_directory_path() / "cnx_plot_png_unwritable";
  fs::remove_all(dir);
  fs::create_directories(dir);
  // A folder that does not exist: the temporary cannot even be created.
  const std::string missing = (dir / "no_such_folder" / "roadmap.png").string();
  try {
    write_bar_chart_png(missing, three_rows(false));
    ADD_FAILURE() << "no error for " << missing;
  } catch (const cnx::Error& e) {
    EXPECT_NE(std::string(e.what()).find(missing), std::string::npos) << e.what();
  }
  // The path is a folder: the temporary is written, the rename fails and must clean up.
  const fs::path folder = dir / "roadmap.png";
  fs::create_directories(folder / "inside");
  try {
    write_bar_chart_png(folder.string(), three_rows(false));
    ADD_FAILURE() << "no error for " << folder;
  } catch (const cnx::Error& e) {
    EXPECT_NE(std::string(e.what()).find(folder.string()), std::string::npos) << e.what();
  }
  EXPECT_FALSE(fs::exists(folder.string() + ".tmp"));
  EXPECT_TRUE(fs::is_directory(folder / "inside"));
  // Nothing else was left in the folder.
  std::vector<std::string> left;
  for (const auto& entry : fs::directory_iterator(dir)) left.push_back(entry.path().filename().string());
  EXPECT_EQ(left, std::vector<std::string>{"roadmap.png"});
  fs::remove_all(dir);
}

TEST(PlotPng, BadChartsThrowClearErrors) {
  BarChart empty;
  empty.title = "roadmap";
  try {
    draw_bar_chart(empty);
    ADD_FAILURE() << "no error for a chart without rows";
  } catch (const cnx::Error& e) {
    EXPECT_NE(std::string(e.what()).find("no rows"), std::string::npos) << e.what();
  }
  const fs::path path = fs::temp_directory_path() / "cnx_plot_png_empty.png";
  EXPECT_THROW(write_bar_chart_png(path.string(), empty), cnx::Error);
  EXPECT_FALSE(fs::exists(path));
  EXPECT_FALSE(fs::exists(path.string() + ".tmp"));

  BarChart nan = three_rows(false);
  nan.rows[1].ours = std::nan("");
  try {
    draw_bar_chart(nan);
    ADD_FAILURE() << "no error for a NaN value";
  } catch (const cnx::Error& e) {
    EXPECT_NE(std::string(e.what()).find("roadmap_01_stage_ratio"), std::string::npos) << e.what();
  }
}

// The chart `convnext roadmap` will draw: all 15 steps, our numbers from a small data set, the
// paper's Figure 2 numbers where it gives one. Set CNX_PLOT_EXAMPLE=/some/file.png to keep it
// and look at it.
TEST(PlotPng, RoadmapExample) {
  BarChart c;
  c.title = "ConvNeXt roadmap: ResNet-50 to ConvNeXt-T";
  const std::optional<double> none;
  c.rows = {{"roadmap_00_resnet50", 85.3, 78.8},
            {"roadmap_01_stage_ratio", 86.0, 79.4},
            {"roadmap_02_patchify_stem", 86.2, 79.5},
            {"roadmap_03_resnextify", 87.1, 80.5},
            {"roadmap_04_inverted_bottleneck", 87.4, 80.6},
            {"roadmap_05_move_up_dwconv", 86.9, 79.9},
            {"roadmap_06_kernel5", 87.5, 80.4},
            {"roadmap_06_kernel7", 88.2, 80.6},
            {"roadmap_06_kernel9", 88.0, none},
            {"roadmap_06_kernel11", 88.1, none},
            {"roadmap_07_gelu", 88.4, 80.6},
            {"roadmap_08_fewer_activations", 89.6, 81.3},
            {"roadmap_09_fewer_norms", 90.3, 81.4},
            {"roadmap_10_layer_norm", 90.8, 81.5},
            {"roadmap_11_convnext_tiny", 91.7, 82.0}};
  const char* keep = std::getenv("CNX_PLOT_EXAMPLE");
  const fs::path path = keep ? fs::path(keep) : fs::temp_directory_path() / "cnx_roadmap_example.png";
  write_bar_chart_png(path.string(), c);
  const Decoded d = decode_png(read_file(path));
  const BarChartLayout L = layout_bar_chart(c);
  EXPECT_EQ(d.width, L.width);
  EXPECT_EQ(d.height, L.height);
  EXPECT_EQ(L.row_top.size(), 15u);
  if (keep) {
    c.shared_axis = true;
    const fs::path p(keep);
    write_bar_chart_png((p.parent_path() / (p.stem().string() + "_shared.png")).string(), c);
  } else {
    fs::remove(path);
  }
}
