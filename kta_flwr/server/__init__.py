"""What the ServerApp does in a run (:mod:`.run`): validate, build the strategy through the
factory, meter the grid, write results and the server's checkpoint after every round,
resume a run, save the final global model. This is where the Flower layer meets the
torch task on the server side."""
