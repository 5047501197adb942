// Errors. Every public entry point validates its arguments and throws cnx::Error with a
// message that names the op and the shapes involved, e.g.
//   "layer_norm: weight has shape [5] but x [2, 3, 3, 4] has 4 channels"
// The CLI catches cnx::Error, prints the one line and exits non-zero.
#pragma once

#include <sstream>
#include <stdexcept>
#include <string>

namespace cnx {

class Error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

namespace detail {
template <class... Args>
std::string concat(const Args&... args) {
  std::ostringstream os;
  (os << ... << args);
  return os.str();
}
}  // namespace detail

// Throws cnx::Error whose message is the arguments streamed one after the other.
template <class... Args>
[[noreturn]] void fail(const Args&... args) {
  throw Error(detail::concat(args...));
}

}  // namespace cnx

// CNX_CHECK(cond, "op: ", "message ", value, ...): throws cnx::Error with the message if !cond.
#define CNX_CHECK(cond, ...)                 \
  do {                                       \
    if (!(cond)) ::cnx::fail(__VA_ARGS__);   \
  } while (0)
