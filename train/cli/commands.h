// Subcommands of the convnext command line. Each registers its options on the app and returns
// the function that runs it once the command line is parsed (exit status; throws on error).
#pragma once

#include <CLI/CLI.hpp>

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

namespace cnx {

struct TrainConfig;

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
Command roadmap_command(CLI::App& app);

// Registers --model NAME and the --depths/--dims pair (each pair needs the other, both exclude
// --model) on `sub`, bound to the three strings.
void add_model_flags(CLI::App* sub, std::string& model, std::string& depths, std::string& dims);

// Every flag of a training recipe (all of train's but --model, --depths and --dims) bound to
// `c`, and --seed to `seed_text` (read it with parse_seed). Shared by train and roadmap.
void add_recipe_flags(CLI::App* sub, TrainConfig& c, std::string& seed_text);
// A seed: decimal digits only, at most 2^64 - 1; throws cnx::Error naming --seed otherwise.
uint64_t parse_seed(const std::string& text);

// "3,3,9,3" -> {3, 3, 9, 3}; throws cnx::Error naming `flag` if it is not a comma-separated
// list of positive integers.
std::vector<int64_t> parse_int_list(const std::string& flag, const std::string& text);

}  // namespace cnx
