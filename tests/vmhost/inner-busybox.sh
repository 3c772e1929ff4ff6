# The busybox-sh counterpart of inner.sh, for an L1 that cannot execute the host's userspace
# (an aarch64 L1 on an x86_64 host): `run` copies it to ctl/inner.sh next to an L1-native
# static busybox, and l1-init runs it chrooted into the host's file system with that busybox's
# sh. Like inner.sh it restores the host's working directory and environment exactly, then
# executes the command. The working directory, arguments and environment come as the files
# cwd.words, args0.words and env0.words, which `run` makes from the NUL-separated cwd, args0
# and env0: each item single-quoted, so that `eval "set -- $(cat FILE)"` gives back every byte
# but NUL. (busybox sh has no `mapfile -d ''`, and its `read -d ''` reads one byte per system
# call, each a round trip to the host on the uncached ctl share: seconds for an environment.)
#
# The command is executed by busybox's env, which prefers busybox applets to PATH lookups: a
# command name such as `sh`, `echo` or `true` runs the applet, a path runs that file. Only
# static aarch64 programs (and scripts whose #! names one, e.g. `#!/run/squib-vmhost/busybox
# sh`) can execute. An ELF program for another machine, or a dynamically linked one whose
# loader is missing, is refused here with a message and status 126 instead of the kernel's
# bare ENOEXEC or misleading ENOENT; a script with a host interpreter (#!/bin/sh) fails in
# env with "Exec format error", also status 126.
ctl=/run/squib-vmhost
bb=$ctl/busybox

eval "cwd=$("$bb" cat "$ctl/cwd.words")"
if ! cd -- "$cwd"; then
    echo "vmhost: cannot enter the working directory '$cwd' inside L1" >&2
    exit 127
fi
env_words=$("$bb" cat "$ctl/env0.words")
args_words=$("$bb" cat "$ctl/args0.words")

# The host's PATH, SHLVL and PWD: each "s<value>" if set, "u" if not.
path_state=u shlvl_state=u pwd_state=u
eval "set -- $env_words"
for item; do
    case $item in
        PATH=*) path_state=s${item#PATH=} ;;
        SHLVL=*) shlvl_state=s${item#SHLVL=} ;;
        PWD=*) pwd_state=s${item#PWD=} ;;
    esac
done
eval "set -- $args_words"
cmd=$1

# refuse FILE: exits 126 with a reason if FILE is an ELF program this L1 cannot execute.
refuse() {
    set -- "$1" $("$bb" od -v -An -tx1 -N20 -- "$1" 2>/dev/null)
    [ "$#" -eq 21 ] && [ "$2$3$4$5" = 7f454c46 ] || return 0
    if [ "${20}${21}" != b700 ]; then
        echo "vmhost: '$1' is not an aarch64 program (ELF machine 0x${21}${20}); an aarch64" \
            "L1 runs only static aarch64 programs and busybox applets" >&2
        exit 126
    fi
    # A dynamically linked program needs its loader (PT_INTERP, program header type 3) at
    # the path it names; the host's root normally has no aarch64 loader.
    set -- "$1" $("$bb" od -An -tu8 -j32 -N8 -- "$1") $("$bb" od -An -tu2 -j54 -N4 -- "$1")
    [ "$#" -eq 4 ] || return 0
    "$bb" od -v -An -tu4 -w"$3" -j"$2" -N"$(($3 * $4))" -- "$1" | while read -r type _ off _; do
        [ "$type" = 3 ] || continue
        interp=$("$bb" tail -c +"$((off + 1))" -- "$1" | "$bb" head -c 4096 |
            "$bb" tr '\0' '\n' | "$bb" head -n1)
        if [ ! -e "$interp" ]; then
            echo "vmhost: '$1' is dynamically linked and its loader $interp is missing in L1;" \
                "link it statically (-static)" >&2
            exit 126
        fi
    done || exit 126
}
case $cmd in
    */*) refuse "$cmd" ;;
    *)
        if ! "$bb" --list | "$bb" grep -qxF -e "$cmd"; then
            # Not an applet: look it up the way env will, along the command's own PATH.
            case $path_state in s*) path=${path_state#s} ;; *) path=/bin:/usr/bin ;; esac
            found=
            IFS=:
            set -f
            for dir in $path; do
                if [ -f "${dir:-.}/$cmd" ] && [ -x "${dir:-.}/$cmd" ]; then
                    found=${dir:-.}/$cmd
                    break
                fi
            done
            set +f
            unset IFS
            if [ -n "$found" ]; then refuse "$found"; fi
        fi
        ;;
esac

case $cmd in
    *=*)
        # env would take a command containing '=' for an assignment, so a busybox sh execs it;
        # that sh sets SHLVL, PATH and PWD on its own, so they are put back first.
        fixup='
            case $1 in s*) export SHLVL="${1#s}" ;; *) unset SHLVL ;; esac
            case $2 in s*) export PATH="${2#s}" ;; *) unset PATH ;; esac
            case $3 in s*) export PWD="${3#s}" ;; *) unset PWD ;; esac
            shift 3
            exec "$@"'
        eval "exec \"\$bb\" env -i -- $env_words \"\$bb\" sh -c \"\$fixup\" vmhost" \
            "\"\$shlvl_state\" \"\$path_state\" \"\$pwd_state\" $args_words"
        ;;
esac
eval "exec \"\$bb\" env -i -- $env_words $args_words"
