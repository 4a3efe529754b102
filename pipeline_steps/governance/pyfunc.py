"""Where model versions registered before the kernel refactor look for their pyfunc class.

MLflow pickles `RadiographDetector` by its module path, so versions logged when it lived here load
only if this path still resolves. New versions reference `pipeline_steps.serving.pyfunc`."""

from pipeline_steps.serving.pyfunc import RadiographDetector

__all__ = ["RadiographDetector"]
