#!/bin/sh
# Provision one chaos VM (run by Vagrant as root):
#   provision.sh NAME IP INITIAL_CLUSTER ENDPOINTS ETCD_SOURCE LAST
# Installs etcd from Debian's packages (or the repo's cached sid build), configures this node's
# member of the 3-member cluster, installs the host-built conch and the chaos helpers.
set -eu
name=$1 ip=$2 cluster=$3 endpoints=$4 etcd_source=$5 last=$6
export DEBIAN_FRONTEND=noninteractive

# Installing etcd-server must not start a single-node etcd: hold service starts back.
printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
chmod 0755 /usr/sbin/policy-rc.d
apt-get update -qq
apt-get install -y -qq --no-install-recommends etcd-server etcd-client iptables nftables python3 chrony
rm -f /usr/sbin/policy-rc.d

mkdir -p /etc/systemd/system/etcd.service.d
{
    echo '[Service]'
    # A member killed by a scenario stays down until the scenario starts it again.
    echo 'Restart=no'
    if [ "$etcd_source" = cache ]; then
        if [ ! -x /conch/.cache/etcd/sid/bin/etcd ]; then
            echo "no /conch/.cache/etcd/sid/bin/etcd: run scripts/fetch-etcd.sh on the host, then vagrant rsync" >&2
            exit 1
        fi
        install -m 0755 /conch/.cache/etcd/sid/bin/etcd /conch/.cache/etcd/sid/bin/etcdctl /usr/local/bin/
        echo 'ExecStart='
        echo 'ExecStart=/usr/local/bin/etcd $DAEMON_ARGS'
    fi
} >/etc/systemd/system/etcd.service.d/chaos.conf

install -d -o etcd -g etcd -m 0700 /var/lib/etcd/chaos
cat >/etc/default/etcd <<EOF
# Written by conch's vagrant/provision.sh
ETCD_NAME=$name
ETCD_DATA_DIR=/var/lib/etcd/chaos
ETCD_LISTEN_CLIENT_URLS=http://$ip:2379
ETCD_ADVERTISE_CLIENT_URLS=http://$ip:2379
ETCD_LISTEN_PEER_URLS=http://$ip:2380
ETCD_INITIAL_ADVERTISE_PEER_URLS=http://$ip:2380
ETCD_INITIAL_CLUSTER=$cluster
ETCD_INITIAL_CLUSTER_TOKEN=conch-vagrant
ETCD_INITIAL_CLUSTER_STATE=new
EOF
systemctl daemon-reload
systemctl enable etcd >/dev/null 2>&1
# --no-block: this member waits for its peers, which Vagrant has not booted yet.
systemctl restart --no-block etcd

# conch, built on the host.
if [ -x /conch/target/release/conch ]; then
    install -m 0755 /conch/target/release/conch /usr/local/bin/conch
else
    echo "WARNING: no /conch/target/release/conch: run 'cargo build --release' on the host," \
        "then 'vagrant rsync && vagrant provision'" >&2
fi

# The chaos helpers: the same test child and checker test-cluster-chaos.sh uses, and chaos-node.
mkdir -p /usr/local/lib/conch-chaos /var/lib/conch-chaos
bash /conch/test-cluster-chaos.sh --helpers /usr/local/lib/conch-chaos
install -m 0755 /conch/vagrant/chaos-node.sh /usr/local/bin/chaos-node
cat >/etc/default/conch-chaos <<EOF
CHAOS_ENDPOINTS=$endpoints
CHAOS_SUBNET=${ip%.*}.0/24
EOF

if [ "$last" = true ]; then
    echo "waiting for the 3-member etcd cluster"
    i=0
    until etcdctl --endpoints="$endpoints" --dial-timeout=2s endpoint health >/dev/null 2>&1; do
        i=$((i + 1))
        if [ "$i" -ge 60 ]; then
            etcdctl --endpoints="$endpoints" endpoint health || true
            echo "the etcd cluster did not become healthy within 60 s" >&2
            exit 1
        fi
        sleep 1
    done
    etcdctl --endpoints="$endpoints" endpoint status -w table
fi
