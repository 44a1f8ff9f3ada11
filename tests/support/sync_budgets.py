"""The sampling engine's host-sync budget, shared by the exact and the cached engine's sync tests."""
ENGINE_SYNCS_PER_WAVE = 3  # K to the host (plan), K.max() (group count), head rows per evaluation to the host
ENGINE_SYNCS_AT_END = 3  # the no-MASK-left check; the E-NFE theory (free counts and step probabilities to the host)
DECODER_SYNCS_PER_WAVE = 2  # the rows' free counts (plan), the rows' evaluations and work at the end of the wave;
# plus one per chunk of SamplerConfig.decoder_check_every evaluations (which rows finished), none per evaluation
