// The process-wide switch of programmatic dependent launch (common.cuh: launch_dependent, pdl_wait).
#include "common.cuh"

namespace ringlinear {
void set_programmatic_launch(bool on) { programmatic_launch_flag().store(on); }
bool programmatic_launch() { return programmatic_launch_flag().load(); }
}  // namespace ringlinear
