"""`genray process`: bulk jobs on Ray Data. job.py plans and runs them, read_stage.py streams archive members
into the job, manifest.py records what happened to every input, gatys.py is the optimisation-based style job."""
