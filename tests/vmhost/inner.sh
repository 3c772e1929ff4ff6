# Runs inside L1, chrooted into the host's file system, as the last step before the command.
# Restores the host's working directory and environment exactly, then executes the command.
# Arguments and environment are NUL-separated files, so every byte but NUL survives.
ctl=/run/squib-vmhost
mapfile -d '' -t args <"$ctl/args0"
mapfile -d '' -t envs <"$ctl/env0"
cwd=$(cat "$ctl/cwd"; printf x)
cwd=${cwd%x}
if ! cd -- "$cwd"; then
    echo "vmhost: cannot enter the working directory '$cwd' inside L1" >&2
    exit 127
fi
# `env` would take a command name containing '=' for an assignment: exec through a shell.
exec /usr/bin/env -i -- "${envs[@]}" /bin/sh -c 'exec "$@"' vmhost "${args[@]}"
