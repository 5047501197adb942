// The convnext command line. Subcommands:
//   train    train a ConvNeXt (train/cli/train_command.cpp, train/trainer.h)
//   eval     Acc@1, Acc@5 and loss of trained weights on a test split
//   predict  top-5 classes of image files
//   grads    one forward/backward pass, for parity checks against PyTorch (grads_command.cpp)
//   roadmap  the paper's roadmap trained step by step (train/roadmap.h)
//   models   the named models (ConvNeXt family, the paper's roadmap) with parameters, GFLOPs
//
// Errors: one line on stderr, "convnext <subcommand>: <what is wrong>", and exit status 1
// (2 for a malformed command line); nothing is written on failure.
#include <CLI/CLI.hpp>

#include <unistd.h>

#include <cstdio>
#include <cstdlib>

#include "tensor/error.h"
#include "train/dist/communicator.h"
#include "train/cli/commands.h"

int main(int argc, char** argv) {
  // OpenMP's default wait policy spins idle threads; next to the data loader's threads (or any
  // other load) on a small machine that costs up to 8x in training speed (measured). libgomp
  // reads the policy before main runs, so set it and start again, once.
  if (std::getenv("OMP_WAIT_POLICY") == nullptr) {
    ::setenv("OMP_WAIT_POLICY", "passive", 1);
    ::execv("/proc/self/exe", argv);  // returns only on failure: then carry on as we are
  }
  CLI::App app{"convnext: ConvNeXt from scratch in C++/CUDA"};
  app.require_subcommand(1);
  app.set_help_all_flag("--help-all", "Show the help of every subcommand");
  std::vector<cnx::Command> commands = {cnx::train_command(app), cnx::eval_command(app),
                                        cnx::predict_command(app), cnx::grads_command(app),
                                        cnx::make_folder_command(app), cnx::models_command(app),
                                        cnx::roadmap_command(app)};

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
      // One of several ranks (mpirun): the others would wait for it in their next collective,
      // so the whole job ends now (MPI_Abort), with this line.
      cnx::dist::Communicator* world = cnx::dist::Communicator::world_if_made();
      if (world != nullptr && world->size() > 1)
        world->abort("convnext " + c.app->get_name() + ": " + e.what() + " (ending every rank)");
      std::fprintf(stderr, "convnext %s: %s\n", c.app->get_name().c_str(), e.what());
      return 1;
    }
  }
  return 2;
}
