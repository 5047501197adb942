// Strings from files in error messages. A tensor name, a dtype string or a metadata key read
// from a file can hold anything: a newline (which would split the one-line error), a terminal
// escape sequence (ESC [ ...: it would recolour or rewrite the user's terminal), invalid UTF-8.
// escape_for_message makes such a string safe to print:
//
//   printable ASCII            kept, except the backslash, which is doubled ("\\")
//   \n \r \t                   "\n" "\r" "\t" (two characters each)
//   other bytes < 0x20, 0x7f   "\xHH", e.g. ESC -> "\x1b"
//   valid UTF-8 (U+00A0 on)    kept as it is (names in any script stay readable), except the
//                              C1 controls U+0080..U+009F, the line and paragraph separators
//                              U+2028, U+2029, the bidirectional overrides and isolates
//                              U+202A..U+202E, U+2066..U+2069 and U+FEFF: their bytes as "\xHH"
//   a byte of invalid UTF-8    "\xHH"
//
// So the result holds no control character and reads back unambiguously.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>

namespace cnx {

inline std::string escape_for_message(std::string_view s) {
  static const char* hex = "0123456789abcdef";
  std::string out;
  out.reserve(s.size());
  auto escape_byte = [&](unsigned char b) {
    out += "\\x";
    out += hex[b >> 4];
    out += hex[b & 0xf];
  };
  size_t i = 0;
  while (i < s.size()) {
    const unsigned char b = static_cast<unsigned char>(s[i]);
    if (b < 0x80) {  // ASCII
      if (b == '\\') out += "\\\\";
      else if (b == '\n') out += "\\n";
      else if (b == '\r') out += "\\r";
      else if (b == '\t') out += "\\t";
      else if (b < 0x20 || b == 0x7f) escape_byte(b);
      else out += static_cast<char>(b);
      ++i;
      continue;
    }
    // The length of a UTF-8 sequence from its lead byte (0: not a lead byte).
    const size_t len = (b & 0xe0) == 0xc0 ? 2 : (b & 0xf0) == 0xe0 ? 3 : (b & 0xf8) == 0xf0 ? 4 : 0;
    uint32_t cp = len == 2 ? (b & 0x1fu) : len == 3 ? (b & 0x0fu) : (b & 0x07u);
    bool valid = len != 0 && i + len <= s.size();
    for (size_t k = 1; valid && k < len; ++k) {
      const unsigned char c = static_cast<unsigned char>(s[i + k]);
      valid = (c & 0xc0) == 0x80;
      cp = (cp << 6) | (c & 0x3fu);
    }
    // Overlong forms, surrogates and code points past U+10FFFF are invalid UTF-8 too.
    if (valid) {
      const uint32_t min = len == 2 ? 0x80 : len == 3 ? 0x800 : 0x10000;
      valid = cp >= min && cp <= 0x10ffff && !(cp >= 0xd800 && cp <= 0xdfff);
    }
    const bool invisible = (cp >= 0x80 && cp <= 0x9f) || cp == 0x2028 || cp == 0x2029 ||
                           (cp >= 0x202a && cp <= 0x202e) || (cp >= 0x2066 && cp <= 0x2069) ||
                           cp == 0xfeff;
    if (!valid) {
      escape_byte(b);
      ++i;
    } else {
      for (size_t k = 0; k < len; ++k) {
        if (invisible) escape_byte(static_cast<unsigned char>(s[i + k]));
        else out += s[i + k];
      }
      i += len;
    }
  }
  return out;
}

}  // namespace cnx
