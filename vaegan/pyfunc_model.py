"""The code a vaegan pyfunc model is logged as (MLflow's models-from-code, `vaegan.pyfunc.MODEL_CODE`).

MLflow copies this file into the model and runs it when the model is loaded; it names the
class that serves the model's artifacts. Nothing else imports it.
"""

import mlflow

from vaegan.pyfunc import VAEGANPyfunc

mlflow.models.set_model(VAEGANPyfunc())
