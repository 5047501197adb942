// Where a tensor's storage lives. The CPU backend is always built; CUDA tensors exist when the
// library was built with nvcc (CNX_CUDA) and a device is present at run time.
#pragma once

#include <string>

namespace cnx {

enum class DeviceType : uint8_t { cpu, cuda };

struct Device {
  DeviceType type = DeviceType::cpu;
  int index = 0;  // the CUDA ordinal; 0 for the CPU

  static Device cpu() { return {DeviceType::cpu, 0}; }
  static Device cuda(int i = 0) { return {DeviceType::cuda, i}; }
  // Parses "cpu", "cuda" or "cuda:N"; throws cnx::Error otherwise.
  static Device parse(const std::string& s);

  bool is_cpu() const { return type == DeviceType::cpu; }
  bool is_cuda() const { return type == DeviceType::cuda; }
  bool operator==(const Device&) const = default;
  std::string str() const { return is_cpu() ? "cpu" : "cuda:" + std::to_string(index); }
};

// True when the library was built with the CUDA backend.
bool cuda_built();
// Number of CUDA devices visible at run time (0 when not built or no driver/device).
int cuda_device_count();

}  // namespace cnx
