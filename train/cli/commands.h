// Subcommands of the convnext command line. Each registers its options on the app and returns
// the function that runs it once the command line is parsed (exit status; throws on error).
#pragma once

#include <CLI/CLI.hpp>

#include <functional>
#include <string>
#include <vector>

namespace cnx {

struct Command {
  CLI::App* app;
  std::function<int()> run;
};

Command grads_command(CLI::App& app);
Command train_command(CLI::App& app);
Command eval_command(CLI::App& app);
Command predict_command(CLI::App& app);
Command make_folder_command(CLI::App& app);
Command models_command(CLI::App& app);

// Registers --model NAME and the --depths/--dims pair (each pair needs the other, both exclude
// --model) on `sub`, bound to the three strings.
void add_model_flags(CLI::App* sub, std::string& model, std::string& depths, std::string& dims);

// "3,3,9,3" -> {3, 3, 9, 3}; throws cnx::Error naming `flag` if it is not a comma-separated
// list of positive integers.
std::vector<int64_t> parse_int_list(const std::string& flag, const std::string& text);

}  // namespace cnx
