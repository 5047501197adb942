// The convnext command line. Subcommands:
//   grads   one forward/backward pass, for parity checks against PyTorch (train/cli/grads_command.cpp)
// (train, eval and predict arrive with the training loop.)
//
// Errors: one line on stderr, "convnext <subcommand>: <what is wrong>", and exit status 1
// (2 for a malformed command line); nothing is written on failure.
#include <CLI/CLI.hpp>

#include <cstdio>

#include "tensor/error.h"
#include "train/cli/commands.h"

int main(int argc, char** argv) {
  CLI::App app{"convnext: ConvNeXt from scratch in C++/CUDA"};
  app.require_subcommand(1);
  app.set_help_all_flag("--help-all", "Show the help of every subcommand");
  std::vector<cnx::Command> commands = {cnx::grads_command(app)};

  try {
    app.parse(argc, argv);
  } catch (const CLI::CallForHelp& e) {
    return app.exit(e);
  } catch (const CLI::CallForAllHelp& e) {
    return app.exit(e);
  } catch (const CLI::ParseError& e) {
    const CLI::App* sub = app.get_subcommands().empty() ? nullptr : app.get_subcommands()[0];
    std::fprintf(stderr, "convnext%s%s: %s (see --help)\n", sub ? " " : "",
                 sub ? sub->get_name().c_str() : "", e.what());
    return 2;
  }
  for (const cnx::Command& c : commands) {
    if (!c.app->parsed()) continue;
    try {
      return c.run();
    } catch (const std::exception& e) {  // cnx::Error and anything else: one line
      std::fprintf(stderr, "convnext %s: %s\n", c.app->get_name().c_str(), e.what());
      return 1;
    }
  }
  return 2;
}
